"""The progress line printed to stdout on every logged step (metrics rank only).

One short line per step that a person can read in a terminal or a SLURM log, and one per
held-out evaluation::

    step   10/50  loss 6.1234  lr 3.00e-03  tok/s 21,345  0.096 s/step  elapsed 0:00:07
    step   10/50  validation loss 6.3021  8,192 tokens in 0.21 s
"""

from __future__ import annotations

import datetime
import sys
from typing import Any, TextIO

from torchtitan.components.metrics import BaseLogger

from fljob.trainer.metrics import VALIDATION_LOSS


class ProgressLogger(BaseLogger):
    """Formats fljob metric records (see :mod:`.processor`) as one line each."""

    def __init__(self, total_steps: int, stream: TextIO = sys.stdout) -> None:
        self.total_steps = total_steps
        self.stream = stream

    def log(self, metrics: dict[str, Any], step: int) -> None:
        width = len(str(self.total_steps))
        head = f"step {step:>{width}}/{self.total_steps}"
        if VALIDATION_LOSS in metrics:
            print(f"{head}  validation loss {metrics[VALIDATION_LOSS]:.4f}  "
                  f"{metrics['validation_tokens']:,} tokens in {metrics['validation_time_s']:.2f} s",
                  file=self.stream, flush=True)
            return
        lrs = list(metrics.get("lr", {}).values())
        parts = [
            head,
            f"loss {metrics['loss']:.4f}",
            f"lr {lrs[0]:.2e}" if lrs else "",
            f"tok/s {metrics['tokens_per_s']:,.0f}",
            f"{metrics['step_time_s']:.3f} s/step",
            f"elapsed {datetime.timedelta(seconds=round(metrics['elapsed_s']))}",
        ]
        print("  ".join(p for p in parts if p), file=self.stream, flush=True)
