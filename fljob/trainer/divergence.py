"""A run whose loss or gradient norm stops being finite: how every rank finds out, together.

:func:`find_non_finite` runs after every optimizer step (see :mod:`.trainer` for where and
why). Each rank looks at what only it has, its share of the step's loss and its shards of
the gradients, and one all-reduce (MAX) of two flags gives every rank the same verdict, so
all of them take the same branch at the same step. The gradients are checked through their
norms: a NaN or infinite element makes its tensor's norm non-finite, and so does a global
norm that overflows, the case in which torchtitan's clipping would scale every gradient by
NaN. It costs one pass over the local gradients (like computing a norm for clipping) and a
two-element all-reduce per step.

:class:`Diverged` ends the run: raised on every rank, it leaves torchtitan's training loop
before that step is checkpointed or evaluated, and the process exits with
:data:`fljob.exitcodes.DIVERGED` (the trainer writes the run summary first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from fljob.exitcodes import DIVERGED

LIKELY_FIXES = ("lower optimizer.lr, add or lengthen warm-up (schedule.warmup_steps), clip "
                "gradients (optimizer.grad_clip_norm), or train in float32 instead of bfloat16 "
                "(training.dtype)")


class Diverged(SystemExit):
    """Raised on every rank at the step where the run diverged; uncaught, it exits DIVERGED.

    A ``SystemExit``, not an ``Exception``: torchtitan's ``train`` is wrapped in torchelastic's
    ``@record``, which records any ``Exception`` as the crash torchrun then reports with its
    traceback. A diverged run is an outcome (a learning rate too high), not a crash.
    """

    def __init__(self, step: int, message: str) -> None:
        super().__init__(DIVERGED)
        self.step, self.message = step, message


@dataclass(frozen=True)
class NonFinite:
    """Which of the step's values were not finite on some rank."""

    loss: bool
    grad_norm: bool

    def __bool__(self) -> bool:
        return self.loss or self.grad_norm

    def describe(self) -> str:
        names = [name for name, bad in (("the training loss", self.loss),
                                        ("the gradient norm", self.grad_norm)) if bad]
        return " and ".join(names)


def _local(t: Tensor) -> Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


@torch.no_grad()
def find_non_finite(losses: list[Tensor], grads: list[Tensor], device: torch.device) -> NonFinite:
    """Whether the step's loss (its micro-batch parts on this rank) or gradients (this rank's
    shards) are non-finite on any rank. A collective: every rank calls it at every step."""
    flags = torch.zeros(2, dtype=torch.float32, device=device)
    if losses:
        flags[0] = ~torch.isfinite(torch.stack([_local(x).float().sum() for x in losses]).sum())
    if grads:
        norms = torch._foreach_norm([_local(g) for g in grads])
        flags[1] = ~torch.isfinite(torch.stack([n.float() for n in norms]).sum())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss, grad_norm = (bool(x) for x in flags.tolist())
    return NonFinite(loss=loss, grad_norm=grad_norm)
