"""End a torch.distributed process group so that no rank aborts after a completed run.

Two races end a finished gloo run with SIGABRT ("terminate called without an active
exception") instead of exit 0, which a launcher reads as a failure and restarts:

1. A rank that destroys its group while a peer still talks to it aborts the peer. Every
   rank that got to the end therefore meets the others at a barrier first.
2. A collective's work item is freed by one of gloo's worker threads after the call has
   returned. Freeing the work frees the tensors it held, and a tensor that Python has seen
   needs the GIL to be released. If the main thread is already finalising the interpreter
   by then, the worker thread is stopped inside a destructor and the process aborts. The
   barrier does not help: its own work item is freed the same way and is what frees the
   earlier ones. So after the barrier the main thread releases the GIL for a moment
   (gloo's worker is already waiting for it) before going on to exit. Measured on the
   two-rank optimizer-statistics test: 1 abort in 6 runs before, none in 60 after.
"""

from __future__ import annotations

import time

import torch.distributed as dist

GLOO_DRAIN_S = 0.2  # far longer than a worker needs to free one work item


def end_process_group(*, all_ranks_here: bool = True) -> None:
    """Destroy the default group, if any. ``all_ranks_here`` says every rank reaches this
    call (a completed, preempted or diverged run); a rank that failed alone must not wait
    at a barrier its peers never reach."""
    if not dist.is_initialized():
        return
    uses_gloo = "gloo" in str(dist.get_backend())
    if all_ranks_here:
        dist.barrier()
    dist.destroy_process_group()
    if uses_gloo:
        time.sleep(GLOO_DRAIN_S)
