"""``<run_dir>/summary.json``: how a run ended, in one small file that needs no torch to read.

The trainer's rank 0 writes it (atomically) after every held-out evaluation and when the run
stops, and copies it beside the checkpoints when those live in object storage
(``<checkpoint.uri>/summary.json``), so that a sweep can be compared from its run folder or
from its bucket prefix alone. ``fljob status`` shows the step and losses from it, ``fljob
sweep report`` compares trials by it.

Losses that are NaN or infinite are written as the strings "nan"/"inf"/"-inf" (JSON has no
spelling for them) and read back as floats; ``diverged`` is true once any train or held-out
loss was not finite.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

SUMMARY_FILE = "summary.json"
SCHEMA_VERSION = 1

REQUIRED = ("name", "run_id", "state", "step", "steps")

RunState = Literal["running", "completed", "preempted", "diverged", "failed"]


@dataclass
class RunSummary:
    """One run's outcome. ``spec`` is the resolved job spec (plain data), ``trial`` its sweep
    trial (``JobSpec.trial``) or None."""

    name: str
    run_id: str
    state: RunState
    step: int
    steps: int
    train_loss: float | None = None
    validation_loss: float | None = None
    validation_step: int | None = None
    diverged: bool = False
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    goodput: dict[str, float] | None = None  # restarts, lost steps, ratio...: trainer.metrics.goodput
    params: int | None = None
    width: int | None = None
    depth: int | None = None
    trial: dict[str, Any] | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(_encode(asdict(self)), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunSummary:
        """Parse a summary; ValueError names what is missing or malformed."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004  (callers catch ValueError: a bad file)
        missing = [name for name in REQUIRED if name not in data]
        if missing:
            raise ValueError(f"missing fields: {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: _decode(k, v) for k, v in data.items() if k in known})


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(key: str, value: Any) -> Any:
    if key in ("train_loss", "validation_loss", "elapsed_s") and isinstance(value, str):
        return float(value)  # "nan", "inf", "-inf"
    return value


def write_summary(run_dir: str | Path, summary: RunSummary, copy_to: str | None = None) -> Path:
    """Write ``run_dir/summary.json`` atomically; also to ``copy_to`` (an object-store folder)."""
    path = Path(run_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SUMMARY_FILE}.{os.getpid()}.tmp")
    text = summary.to_json()
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    if copy_to:
        from fljob import storage

        storage.write_bytes(storage.join(copy_to, SUMMARY_FILE), text.encode())
    return path


def read_summary(run_dir: str | Path) -> RunSummary | None:
    """The summary in a run folder (local path), None when there is none yet."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return RunSummary.from_json(text)
