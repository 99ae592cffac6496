"""``<run_dir>/metrics.jsonl``: one JSON object per logged step, the run's durable record.

A torchtitan logger backend (``BaseLogger``), attached on the metrics rank only. Each record
is written and flushed as one line, so a run that is killed or preempted leaves a file
whose every line parses; a requeued run appends to the same file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torchtitan.components.metrics import BaseLogger


class JsonlLogger(BaseLogger):
    """Appends ``{"step": step, **record}`` to a JSON-lines file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())

    def log(self, metrics: dict[str, Any], step: int) -> None:
        line = json.dumps({"step": step, **_finite(metrics)}, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _finite(value: Any) -> Any:
    """NaN and infinities as strings: JSON has no spelling for them (json.dumps would emit
    the non-standard NaN/Infinity tokens that strict parsers reject)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value
