"""What a run carries from process to process: its tracking id and its goodput ledger.

A run is every process that trains it: the first one, and each requeued, restarted or
resubmitted one that resumes its checkpoint. Rank 0 keeps, for the whole run:

* the **tracking id**, the W&B run id and the TensorBoard folder name (:mod:`.tracking`).
  The first process derives it from the ``job`` and ``run_id`` labels (``FLJOB_JOB_NAME``,
  ``FLJOB_RUN_ID``, see :func:`tracking_id`); every later one takes it from the checkpoint it
  resumes, so a resubmission that gets a new ``FLJOB_RUN_ID`` (the local backend makes one
  per submit) still continues the same W&B run and TensorBoard folder.
* the **goodput ledger** (:class:`Ledger`), totals over every process so far:

  - ``attempts``: processes that ran the run (restarts = attempts - 1);
  - ``lost_steps``: steps a process trained beyond the step the next one resumed from
    (trained, then not committed: killed after the grace period, a failed save, a crash);
  - ``checkpoint_blocked_s``: time the training loop spent in saves that were due (a
    synchronous save whole; for an asynchronous one its staging and the wait for the save
    before it);
  - ``productive_s``: time of the training steps the run kept: each step's whole
    ``train_step`` (data, forward, backward, optimizer, its metrics), lost steps taken out;
  - ``wall_s``: how long the run's processes have lived (each from the start the kernel
    recorded; the queue time between them is not the run's).

  Per process, ``startup_s`` is the time from its start to its first training step
  (imports, building the model, loading the checkpoint, opening the sinks), and the goodput
  ``ratio`` is ``productive_s / wall_s``.

Where it lives. Every checkpoint's manifest carries the tracking id and the ledger as of its
save (``manifest["run"]``), so a resume restores them whatever else was lost. What a process
did after its last commit only ``<run_dir>/goodput.json`` knows: rank 0 rewrites it after
every step (the same entry plus the highest step trained) and when it closes. A resume that
finds it, for the same tracking id and at or past the resumed step, takes attempts, lost
steps, blocked and wall time from it and adds ``trained_step - resumed step`` lost steps;
productive time always comes from the checkpoint (exactly the steps it holds). Without the
file (a run folder that did not survive, e.g. inside a Kubernetes pod) the totals are the
checkpoint's: time and steps after the last commit are not counted.

Every rank builds a ledger (the checkpointer asks each for its manifest entry), but only rank
0's, the metrics rank's, reads or writes anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fljob.processes import start_time
from fljob.storage import write_bytes

log = logging.getLogger(__name__)

PROGRESS_FILE = "goodput.json"
MANIFEST_KEY = "run"
"""The manifest's entry: ``{"tracking_id": ..., "goodput": {<Ledger fields>}}``."""
TRACKING_ID_MAX = 64
_IMPORTED = time.time()


def tracking_id(job: str, run_id: str) -> str:
    """``<job>-<run_id>`` (or ``job`` alone when they are equal), usable as a W&B run id and a
    folder name: at most 64 of ``[A-Za-z0-9_.-]``; anything else replaced, and then a short
    hash of the original appended so that two labels never share an id."""
    text = job if run_id == job else f"{job}-{run_id}"
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", text)
    if safe == text and len(safe) <= TRACKING_ID_MAX:
        return safe
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{safe[:TRACKING_ID_MAX - 9]}-{digest}"


def process_start_time() -> float:
    """Unix time at which this process started, from the kernel's record (``/proc``; the
    interpreter's start-up and imports count), else the time this module was imported."""
    started = start_time(os.getpid())
    return _IMPORTED if started is None else started


@dataclass
class Ledger:
    """Goodput totals over a run's processes (see the module docstring)."""

    attempts: int = 0
    lost_steps: int = 0
    checkpoint_blocked_s: float = 0.0
    productive_s: float = 0.0
    wall_s: float = 0.0

    @classmethod
    def from_json(cls, data: Any) -> Ledger:
        """The ledger a manifest or progress file recorded; a missing or malformed value
        (an older fljob, a damaged file) counts as 0."""
        ledger = cls()
        if isinstance(data, dict):
            for f in fields(cls):
                value = data.get(f.name)
                if isinstance(value, int | float) and not isinstance(value, bool) \
                        and math.isfinite(value) and value >= 0:
                    setattr(ledger, f.name, type(getattr(ledger, f.name))(value))
        return ledger


class RunLedger:
    """One process's view of the run: the totals of the processes before it and its own."""

    def __init__(self, *, job: str, run_id: str, run_dir: str, blocked_seconds: Callable[[], float],
                 rank0: bool, started: float | None = None) -> None:
        """``blocked_seconds`` is this process's time in checkpoint saves so far (the
        checkpointer's); ``started`` the process's start as Unix time (default: the kernel's)."""
        self.tracking_id = tracking_id(job, run_id)
        self.progress_path = Path(run_dir) / PROGRESS_FILE
        self.started = process_start_time() if started is None else started
        self.blocked_seconds = blocked_seconds
        self.rank0 = rank0
        self.before = Ledger(attempts=1)  # the earlier processes' totals, this one's attempt counted
        self.productive_s = 0.0
        self.startup_s: float | None = None
        self.trained_step = 0
        self._step_began = 0.0
        self._resumed = False  # until then, the progress file is the previous process's
        self._write_failed = False

    def resume(self, step: int, manifest: Mapping[str, Any] | None) -> None:
        """Once the checkpoint is loaded, before the first step: ``step`` is the resumed step
        (0 on a fresh start), ``manifest`` the resumed checkpoint's (None when there is none)."""
        self.trained_step = step
        if not self.rank0:
            return
        entry = (manifest or {}).get(MANIFEST_KEY)
        entry = entry if isinstance(entry, dict) else {}
        if isinstance(entry.get("tracking_id"), str) and entry["tracking_id"]:
            self.tracking_id = entry["tracking_id"]
        before = Ledger.from_json(entry.get("goodput"))
        if step > 0:  # a checkpoint from an fljob without a ledger was still written by someone
            before.attempts = max(before.attempts, 1)
        earlier = self._read_progress()
        trained = earlier.get("trained_step") if earlier else None
        if earlier and earlier.get("tracking_id") == self.tracking_id and isinstance(trained, int) \
                and trained >= step:
            committed_productive = before.productive_s
            before = Ledger.from_json(earlier.get("goodput"))
            before.lost_steps += trained - step
            before.productive_s = committed_productive
            if trained > step:
                log.warning("Goodput: the previous process trained to step %d, this one resumes at "
                            "step %d: %d steps lost", trained, step, trained - step)
        before.attempts += 1
        self.before = before
        self._resumed = True
        self.save_progress()

    def _read_progress(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.progress_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def begin_step(self) -> None:
        now = time.time()
        if self.startup_s is None:
            self.startup_s = now - self.started
        self._step_began = now

    def end_step(self, step: int) -> None:
        """The step that began at :meth:`begin_step` is done: its time is productive."""
        self.productive_s += time.time() - self._step_began
        self.trained_step = step
        self.save_progress()

    def totals(self) -> Ledger:
        """The run's ledger as of now."""
        b = self.before
        return Ledger(attempts=b.attempts, lost_steps=b.lost_steps,
                      checkpoint_blocked_s=b.checkpoint_blocked_s + self.blocked_seconds(),
                      productive_s=b.productive_s + self.productive_s,
                      wall_s=b.wall_s + time.time() - self.started)

    def manifest_entry(self) -> dict[str, Any]:
        """What a checkpoint saved now carries (``manifest["run"]``)."""
        return {"tracking_id": self.tracking_id, "goodput": asdict(self.totals())}

    def metrics(self) -> dict[str, float]:
        """The record's ``goodput`` section (keys of :data:`fljob.observability.series.GOODPUT`)."""
        t = self.totals()
        out = {"restarts": float(t.attempts - 1), "lost_steps": float(t.lost_steps),
               "checkpoint_blocked_s": t.checkpoint_blocked_s, "productive_s": t.productive_s,
               "wall_s": t.wall_s, "ratio": t.productive_s / t.wall_s if t.wall_s > 0 else 0.0}
        if self.startup_s is not None:
            out["startup_s"] = self.startup_s
        return out

    def save_progress(self) -> None:
        """Rank 0, once resumed: ``<run_dir>/goodput.json``, written whole and renamed into
        place. A failure (a full disk) is logged once; training goes on."""
        if not self.rank0 or not self._resumed:
            return
        data = {**self.manifest_entry(), "trained_step": self.trained_step}
        try:
            write_bytes(str(self.progress_path), json.dumps(data, indent=1).encode())
        except OSError as exc:
            if not self._write_failed:
                log.warning("Goodput: cannot write %s (%s); lost steps after the next restart "
                            "will be counted from the checkpoint only", self.progress_path, exc)
            self._write_failed = True
