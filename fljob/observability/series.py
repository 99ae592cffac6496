"""Every Prometheus series the trainer exports: name, type, help and labels, in one place.

The exporter (:mod:`fljob.trainer.metrics.prometheus`) builds its collectors from this
catalogue and the dashboards and alert rules query the names defined here, so a rename
that would leave a panel silently empty fails a test instead.

Conventions (Prometheus naming practice): the ``fljob_`` prefix, base units (seconds,
bytes, ratios 0-1), ``_total`` on counters. Every series carries ``job`` and ``run_id``
(:data:`RUN_LABELS`); per-group series add ``group``, the muP parameter group (a handful of
values plus ``all``), never one value per tensor. Counters count from zero in each process
(a resumed run restarts them, which ``rate()`` handles); the progress a checkpoint restores
(step, consumed tokens, the goodput totals) is exported as gauges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RUN_LABELS = ("job", "run_id")
JOB_ENV, RUN_ID_ENV = "FLJOB_JOB_NAME", "FLJOB_RUN_ID"
"""Where the exporter reads the values of :data:`RUN_LABELS` (every backend's run script sets them)."""
GROUP_LABEL = "group"

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class Series:
    """One exported metric family. ``name`` is the exposed name (counters end in ``_total``)."""

    name: str
    kind: Kind
    help: str
    grouped: bool = False
    buckets: tuple[float, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return (*RUN_LABELS, GROUP_LABEL) if self.grouped else RUN_LABELS


# Step times from a tiny CPU model (~0.05 s) to a large model's multi-minute steps.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

STEP = Series("fljob_step", "gauge", "Last completed training step (restored from the checkpoint on resume).")
CONSUMED_TOKENS = Series(
    "fljob_consumed_tokens", "gauge",
    "Tokens the run has trained on, all ranks, including those before a resume.")
TOKENS = Series(
    "fljob_tokens_total", "counter",
    "Tokens trained on by this process's run since it started, all ranks; rate() is tokens/s.")
TOKENS_PER_SECOND = Series(
    "fljob_tokens_per_second", "gauge", "Throughput over the last logging window, all ranks.")
LOSS = Series("fljob_loss", "gauge", "Mean training loss over all ranks' tokens of the last logged step.")
LOSS_MAX = Series("fljob_loss_max", "gauge", "Largest per-rank mean training loss of the last logged step.")
GRAD_NORM = Series(
    "fljob_grad_norm", "gauge", "Global gradient norm of the last logged step, before clipping.")
LEARNING_RATE = Series(
    "fljob_learning_rate", "gauge", "Learning rate of each muP parameter group.", grouped=True)
MFU = Series(
    "fljob_mfu_ratio", "gauge",
    "Model FLOPs utilisation over the last logging window (0-1; 0 where the peak is unknown).")
STEP_DURATION = Series(
    "fljob_step_duration_seconds", "histogram",
    "Wall time of each training step on rank 0, from one optimizer step to the next.",
    buckets=STEP_BUCKETS)
DATA_WAIT = Series(
    "fljob_data_wait_seconds_total", "counter",
    "Time the training loop waited for the next batch (slowest rank per logging window).")
DEVICE_MEMORY = Series(
    "fljob_device_memory_peak_bytes", "gauge",
    "Peak reserved device memory in the last logging window, the largest over ranks "
    "(peak RSS on CPU).")
VALIDATION_LOSS = Series(
    "fljob_validation_loss", "gauge",
    "Mean loss over the held-out tokens of the last evaluation, all ranks "
    "(training.validation_interval).")
DIVERGED = Series(
    "fljob_diverged", "gauge",
    "1 once the run stopped because its loss or gradient norm was not finite (exit code 3), "
    "else 0.")
LAST_STEP_TIME = Series(
    "fljob_last_step_timestamp_seconds", "gauge", "Unix time when the last logged step finished.")
START_TIME = Series("fljob_start_time_seconds", "gauge", "Unix time when this process started exporting.")

OPTIMIZER = {
    stat: Series(f"fljob_optimizer_{stat}", "gauge", text, grouped=True)
    for stat, text in {
        "param_norm": "L2 norm of the group's parameters after the step.",
        "grad_norm": "L2 norm of the gradients the step consumed (after clipping).",
        "grad_max_abs": "Largest absolute gradient element of the group.",
        "update_norm": "L2 norm of the change the optimizer step made to the parameters.",
        "update_ratio": "update_norm / param_norm of the group.",
        "exp_avg_norm": "L2 norm of the first moment (exp_avg).",
        "exp_avg_sq_sqrt_norm": "L2 norm of sqrt(second moment), in gradient units.",
    }.items()
}
"""Optimizer statistics of :mod:`fljob.trainer.metrics.optimizer_stats`, one per stat key."""

CHECKPOINT_SAVE_DURATION = Series(
    "fljob_checkpoint_save_duration_seconds", "histogram",
    "Time from the start of a checkpoint save to its commit.", buckets=CHECKPOINT_BUCKETS)
CHECKPOINT_WRITTEN_BYTES = Series(
    "fljob_checkpoint_written_bytes_total", "counter", "Bytes of committed checkpoints written by this process.")
CHECKPOINT_SIZE = Series("fljob_checkpoint_size_bytes", "gauge", "Size of the last committed checkpoint.")
CHECKPOINT_STEP = Series("fljob_checkpoint_step", "gauge", "Training step of the last committed checkpoint.")
CHECKPOINT_COMMITTED = Series(
    "fljob_checkpoint_last_commit_timestamp_seconds", "gauge",
    "Unix time the last checkpoint was committed; its age is time() minus this.")

GOODPUT = {
    key: Series(name, "gauge", text)
    for key, name, text in (
        ("restarts", "fljob_goodput_restarts",
         "Times the run was started again and resumed (requeues, resubmissions)."),
        ("lost_steps", "fljob_goodput_lost_steps",
         "Steps trained and then lost before a restart (never committed), over the run's life."),
        ("checkpoint_blocked_s", "fljob_goodput_checkpoint_blocked_seconds",
         "Time the training loop waited on checkpoint saves, over the run's life."),
        ("startup_s", "fljob_goodput_startup_seconds",
         "Time from this process's start to its first training step."),
        ("productive_s", "fljob_goodput_productive_seconds",
         "Time spent in training steps the run kept (lost steps excluded), over the run's life."),
        ("wall_s", "fljob_goodput_wall_seconds",
         "Wall time of all the run's trainer processes so far (queue time excluded)."),
        ("ratio", "fljob_goodput_ratio", "Productive step time as a fraction of wall time (0-1)."),
    )
}
"""Goodput across requeues, by the key of the record's ``goodput`` section
(:mod:`fljob.trainer.metrics.goodput`). All gauges: every value but the start-up time is a
total the checkpoint carries from process to process."""

ALL: tuple[Series, ...] = (
    STEP, CONSUMED_TOKENS, TOKENS, TOKENS_PER_SECOND, LOSS, LOSS_MAX, GRAD_NORM, LEARNING_RATE, MFU,
    STEP_DURATION, DATA_WAIT, DEVICE_MEMORY, VALIDATION_LOSS, DIVERGED, LAST_STEP_TIME, START_TIME,
    *OPTIMIZER.values(),
    CHECKPOINT_SAVE_DURATION, CHECKPOINT_WRITTEN_BYTES, CHECKPOINT_SIZE, CHECKPOINT_STEP,
    CHECKPOINT_COMMITTED, *GOODPUT.values(),
)


def exposed_names() -> set[str]:
    """Every sample name that can appear on /metrics (histograms' _bucket/_sum/_count too)."""
    names: set[str] = set()
    for s in ALL:
        names.update((f"{s.name}_bucket", f"{s.name}_sum", f"{s.name}_count") if s.kind == "histogram"
                     else (s.name,))
    return names
