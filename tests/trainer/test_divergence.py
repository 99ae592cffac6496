"""The divergence check on a real 2-process gloo world: a non-finite value on one rank is
every rank's verdict, and it says which value it was."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from ports import free_port

pytest.importorskip("torchtitan")

import torch
import torch.multiprocessing as mp

from fljob.trainer.divergence import NonFinite, find_non_finite
from fljob.trainer.process_group import end_process_group

# Per case: what each rank holds (its loss parts, its gradient shards).
CASES = {
    "finite": [([1.0, 2.0], [[0.5, -0.5]]), ([1.5], [[0.1], [2.0]])],
    "nan-loss-on-rank-1": [([1.0], [[0.5]]), ([1.0, math.nan], [[0.5]])],
    "inf-grad-on-rank-0": [([1.0], [[0.5], [math.inf, 1.0]]), ([1.0], [[0.5]])],
    "norm-overflows-on-rank-1": [([1.0], [[0.5]]), ([2.0], [[3e38, 3e38]])],
    "both-on-different-ranks": [([math.inf], [[0.5]]), ([1.0], [[math.nan]])],
}
EXPECTED = {
    "finite": NonFinite(loss=False, grad_norm=False),
    "nan-loss-on-rank-1": NonFinite(loss=True, grad_norm=False),
    "inf-grad-on-rank-0": NonFinite(loss=False, grad_norm=True),
    "norm-overflows-on-rank-1": NonFinite(loss=False, grad_norm=True),
    "both-on-different-ranks": NonFinite(loss=True, grad_norm=True),
}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    verdicts = {}
    for name, held in CASES.items():
        losses, grads = held[rank]
        found = find_non_finite([torch.tensor(x) for x in losses],
                                [torch.tensor(g) for g in grads], torch.device("cpu"))
        verdicts[name] = [found.loss, found.grad_norm]
    Path(out, f"rank{rank}.json").write_text(json.dumps(verdicts))
    end_process_group()


@pytest.mark.slow
def test_every_rank_gets_the_same_verdict_whichever_rank_saw_it(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    verdicts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert verdicts[0] == verdicts[1]
    for name, expected in EXPECTED.items():
        assert NonFinite(*verdicts[0][name]) == expected, name


def test_the_verdict_names_what_was_not_finite() -> None:
    assert not NonFinite(loss=False, grad_norm=False)
    assert NonFinite(loss=True, grad_norm=False).describe() == "the training loss"
    assert NonFinite(loss=True, grad_norm=True).describe() == (
        "the training loss and the gradient norm")
