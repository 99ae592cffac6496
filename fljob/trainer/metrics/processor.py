"""fljob's torchtitan ``MetricsProcessor``: what each logged step records, and where it goes.

torchtitan computes loss, gradient norm, throughput and memory on every logging step and
hands one dict to its logger backends. This subclass adds what muP training needs to see
(the learning rate of every parameter group, the optimizer statistics of
:mod:`.optimizer_stats` and the goodput of :mod:`.goodput`), then, on rank 0, renames the dict
into fljob's record and hands it to fljob's sinks: ``<run_dir>/metrics.jsonl``, the stdout
progress line, Prometheus (:mod:`.prometheus`, when ``metrics.enabled``), and TensorBoard and
W&B (:mod:`.tracking`, when the spec sets them; they open once the run's identity is known).

A record::

    {"step": 10, "loss": 6.12, "loss_max": 6.3, "grad_norm": 1.9,
     "lr": {"embedding": 0.003, "hidden": 0.0008, ...}, "tokens_per_s": 21345.0,
     "tokens_per_s_per_device": 10672.5, "tokens_seen": 40960, "step_time_s": 0.096,
     "data_time_s": 0.001, "elapsed_s": 7.4, "mfu_pct": 0.0, "memory_gib": 0.6,
     "tokens": 40960, "data_wait_s": 0.01, "memory_bytes": 644245094,
     "optim": {"hidden": {"grad_norm": 0.8, "update_ratio": 0.002, ...}, "all": {...}},
     "goodput": {"restarts": 1.0, "lost_steps": 0.0, "checkpoint_blocked_s": 1.2,
                 "startup_s": 6.1, "productive_s": 5.0, "wall_s": 14.3, "ratio": 0.35}}

``optim`` appears on logging steps that are multiples of ``metrics.optimizer_interval``.
``tokens`` (all ranks), ``data_wait_s`` and ``memory_bytes`` (peak reserved; both the largest
over ranks) cover the steps since the previous record. ``goodput`` is rank 0's ledger as of
the record (:mod:`.goodput`: totals over every process of the run, ``startup_s`` this
process's).

A held-out evaluation (:mod:`fljob.trainer.validation`) is a record of its own, after the
training record of the same step; it has no ``loss`` key, so readers of the training loss
never mistake it::

    {"step": 10, "validation_loss": 6.4, "validation_tokens": 8192,
     "validation_time_s": 0.21, "elapsed_s": 7.6}

Its time is kept out of the next training record's throughput and step time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torchtitan.components.metrics import BaseLogger, LoggerContainer, MetricsProcessor
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from fljob.trainer.job_config import job_spec
from fljob.trainer.metrics import VALIDATION_LOSS
from fljob.trainer.metrics.goodput import RunLedger
from fljob.trainer.metrics.jsonl import JsonlLogger
from fljob.trainer.metrics.optimizer_stats import OptimizerStats
from fljob.trainer.metrics.progress import ProgressLogger
from fljob.trainer.metrics.prometheus import PrometheusLogger, build_prometheus_logger

METRICS_FILE = "metrics.jsonl"
VALIDATION_LOSS_KEY = "validation_metrics/loss"  # torchtitan's key in log_validation
VALIDATION_TOKENS_KEY = "validation_metrics/tokens"
VALIDATION_TIME_KEY = "validation_metrics/time_s"

def fljob_record(metrics: dict[str, Any], world_size: int, elapsed_s: float) -> dict[str, Any]:
    """fljob's record of one step from torchtitan's metrics dict (plus ``lr/`` and ``optim/``).

    torchtitan metrics not named here (TFLOPS, memory percentages, ...) are not recorded.
    """
    optim: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith("optim/"):
            _, group, stat = key.split("/", 2)
            optim.setdefault(group, {})[stat] = value
    goodput = {k.removeprefix("goodput/"): v for k, v in metrics.items() if k.startswith("goodput/")}
    per_device = metrics["throughput(tps)"]
    record: dict[str, Any] = {
        "loss": metrics["loss_metrics/global_avg_loss"],
        "loss_max": metrics["loss_metrics/global_max_loss"],
        "grad_norm": metrics["grad_norm"],
        "lr": {k.removeprefix("lr/"): v for k, v in metrics.items() if k.startswith("lr/")},
        # torchtitan's throughput is per device; every device processes its own tokens.
        "tokens_per_s": per_device * world_size,
        "tokens_per_s_per_device": per_device,
        "tokens_seen": int(metrics["n_tokens_seen"]),
        "step_time_s": metrics["time_metrics/end_to_end(s)"],
        "data_time_s": metrics["time_metrics/data_loading(s)"],
        "elapsed_s": elapsed_s,
        "mfu_pct": metrics["mfu(%)"],
        "memory_gib": metrics["memory/max_reserved(GiB)"],
        "tokens": int(metrics["window/tokens"]),
        "data_wait_s": metrics["window/data_wait_s"],
        "memory_bytes": int(metrics["window/max_reserved_bytes"]),
    }
    if optim:
        record["optim"] = optim
    if goodput:
        record["goodput"] = goodput
    return record


def validation_record(metrics: dict[str, Any], elapsed_s: float) -> dict[str, Any]:
    """fljob's record of a held-out evaluation from :meth:`FljobMetricsProcessor.log_validation`."""
    return {VALIDATION_LOSS: metrics[VALIDATION_LOSS_KEY],
            "validation_tokens": int(metrics[VALIDATION_TOKENS_KEY]),
            "validation_time_s": metrics[VALIDATION_TIME_KEY], "elapsed_s": elapsed_s}


class RecordLogger(BaseLogger):
    """A torchtitan logger backend that feeds fljob records to fljob's sinks."""

    def __init__(self, sinks: list[BaseLogger], world_size: int) -> None:
        self.sinks, self.world_size = sinks, world_size
        self.start = time.perf_counter()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        elapsed = time.perf_counter() - self.start
        record = (validation_record(metrics, elapsed) if VALIDATION_LOSS_KEY in metrics
                  else fljob_record(metrics, self.world_size, elapsed))
        for sink in self.sinks:
            sink.log(record, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class FljobMetricsProcessor(MetricsProcessor):
    """torchtitan's processor plus per-group lrs, optimizer statistics and fljob's sinks.

    Built by the TrainSpec like torchtitan's; the trainer then calls :meth:`watch` once
    its optimizers exist, and :meth:`start_run` once the checkpoint is loaded.
    """

    def __init__(self, job_config: JobConfig, parallel_dims: ParallelDims, tag: str | None = None):
        super().__init__(job_config, parallel_dims, tag)
        spec = self.spec = job_spec(job_config)
        self.optimizer_interval = spec.metrics.optimizer_interval
        self._stats: OptimizerStats | None = None
        self._step_lrs: dict[str, float] = {}
        self._step_stats: dict[str, float] = {}
        self._device = torch.device("cpu")  # the optimizer's, once watched
        self._prometheus: PrometheusLogger | None = None
        self._records: RecordLogger | None = None  # rank 0's
        self._ledger: RunLedger | None = None
        self._last_step_end: float | None = None
        # The last logged step's global values (every rank has them: torchtitan reduces them).
        self.last_logged_step: int | None = None
        self.last_loss: float | None = None
        self.last_grad_norm: float | None = None
        if dist.get_rank() == 0:  # the metrics rank: fljob models have no pipeline stages
            sinks: list[BaseLogger] = [
                JsonlLogger(Path(spec.resolved_run_dir) / METRICS_FILE),
                ProgressLogger(job_config.training.steps),
            ]
            if spec.metrics.enabled:
                self._prometheus = build_prometheus_logger(spec)
                sinks.append(self._prometheus)
            self._records = RecordLogger(sinks, parallel_dims.world_size)
            loggers = LoggerContainer()
            loggers.add_logger(self.logger)  # torchtitan's own: fljob leaves its TensorBoard/W&B off
            loggers.add_logger(self._records)
            self.logger = loggers

    def start_run(self, ledger: RunLedger, first_step: int) -> None:
        """Once the checkpoint is loaded (the run's identity restored): records carry the
        ledger's goodput from now on, and rank 0 opens the TensorBoard and W&B sinks."""
        self._ledger = ledger
        metrics = self.spec.metrics
        if self._records is not None and (metrics.tensorboard is not None or metrics.wandb is not None):
            from fljob.trainer.metrics.tracking import open_tracking_sinks  # 0.1 s of imports

            self._records.sinks += open_tracking_sinks(self.spec, ledger.tracking_id, first_step)

    def watch(self, optimizers: OptimizersContainer, current_step: Callable[[], int]) -> None:
        """Observe every optimizer step through hooks on the container.

        Before the step (gradients clipped, lrs those the step uses): remember the lrs
        and, on logging steps, start the statistics; after it, finish them. The
        statistics run collectives, so every rank takes the same branches.
        """
        if len(optimizers.optimizers) != 1:
            raise ValueError("fljob trains one model part (no pipeline parallelism)")
        optimizer: Optimizer = optimizers.optimizers[0]
        stats = self._stats = OptimizerStats(optimizer, interval=self.optimizer_interval)
        self._device = next(p for g in optimizer.param_groups for p in g["params"]).device

        def before_step(*_: Any) -> None:
            step = current_step()
            self._step_lrs = {name: float(group["lr"]) for name, group
                              in zip(stats.group_names, optimizer.param_groups, strict=True)}
            if self.should_log(step):
                stats.before_step(step)

        def after_step(*_: Any) -> None:
            step = current_step()
            if self.should_log(step):
                self._step_stats = stats.after_step(step) or {}
            if self._prometheus is not None:  # step time: optimizer step to optimizer step
                now = time.perf_counter()
                if self._last_step_end is not None:
                    self._prometheus.metrics.observe_step_time(now - self._last_step_end)
                self._last_step_end = now

        optimizers.register_step_pre_hook(before_step)
        optimizers.register_step_post_hook(after_step)

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict[str, Any] | None = None) -> None:
        self.last_logged_step, self.last_loss, self.last_grad_norm = step, global_avg_loss, grad_norm
        extra = {k: v for k, v in (extra_metrics or {}).items() if k != "lr"}  # one group's
        extra.update({f"lr/{name}": lr for name, lr in self._step_lrs.items()})
        extra.update(self._step_stats)
        extra.update(self._window_metrics())
        if self._ledger is not None:
            extra.update({f"goodput/{k}": v for k, v in self._ledger.metrics().items()})
        self._step_stats = {}
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)

    def log_validation(self, loss: float, step: int,
                       extra_metrics: dict[str, Any] | None = None) -> None:
        """Record a held-out evaluation (``extra_metrics`` carries its tokens and seconds).

        Not torchtitan's: that one resets the training window (token count, clock, peak
        memory), losing the tokens of the steps since the last record. This one leaves the
        window alone and only takes the evaluation's time out of it.
        """
        self.logger.log({VALIDATION_LOSS_KEY: loss, **(extra_metrics or {})}, step)
        seconds = float((extra_metrics or {}).get(VALIDATION_TIME_KEY, 0.0))
        self.time_last_log += seconds
        if self._last_step_end is not None:
            self._last_step_end += seconds

    def record_divergence(self) -> None:
        """The run stopped on a non-finite loss or gradient norm: tell Prometheus."""
        if self._prometheus is not None:
            self._prometheus.metrics.mark_diverged()

    def _window_metrics(self) -> dict[str, float]:
        """Tokens of all ranks since the last log, and the largest data wait and peak memory
        of any rank (one small all-reduce; every rank logs the same steps)."""
        peak = self.device_memory_monitor.get_peak_stats()
        worst = torch.tensor([sum(self.data_loading_times), peak.max_reserved_gib * 2**30],
                             dtype=torch.float64, device=self._device)
        if dist.get_world_size() > 1:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        data_wait, reserved = worst.tolist()
        dims = self.parallel_dims  # each data-parallel replica reads its own tokens
        tokens = self.ntokens_since_last_log * dims.world_size // dims.non_data_parallel_size
        return {"window/tokens": tokens, "window/data_wait_s": data_wait,
                "window/max_reserved_bytes": reserved}
