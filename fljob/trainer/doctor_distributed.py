"""`fljob doctor --distributed`: prove the allocation and rendezvous work before training.

Runs in every worker under `fljob launch` (torchrun): joins the default process group through
the rendezvous torchrun was given, all-reduces the rank ids, and prints one line per rank.
The expected sum is 0 + 1 + ... + (world - 1); any other value (or a hang) means the job's
networking is wrong, and is cheaper to learn here than 30 minutes into a training run.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta


def main() -> int:
    import torch
    import torch.distributed as dist

    from fljob.trainer.process_group import end_process_group

    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=120))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        value = torch.tensor([float(rank)], device=device)
        dist.all_reduce(value)
        expected = world * (world - 1) / 2
        ok = float(value.item()) == expected
        print(
            f"fljob doctor: rank={rank} world_size={world} local_rank={local_rank} host={socket.gethostname()} "
            f"backend={backend} all_reduce_sum={value.item():g} expected={expected:g} {'ok' if ok else 'MISMATCH'}",
            flush=True,
        )
    except BaseException:
        end_process_group(all_ranks_here=False)
        raise
    end_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
