"""The trainer's half of the preemption contract: a signal asks every rank to stop together.

SLURM sends SIGUSR2 before the time limit (``--signal=B:USR2@grace``) and Kubernetes SIGTERM
before killing a pod; ``fljob launch`` forwards both to every worker. The handler only sets
a flag, so the step in flight finishes normally. Ranks may receive the signal at different
moments, so the decision to stop is an all-reduce (MAX) of the flag between steps: every
rank sees the same answer after the same step and stops there.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preemption:
    """Installs the signal handlers on construction; :meth:`agreed` is the collective check."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.signal = signum

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was signalled; a collective, so every rank calls it together."""
        flag = torch.tensor([self.signal is not None], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
