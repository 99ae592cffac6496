"""Rank 0's Prometheus endpoint: the ``fljob_`` series of :mod:`fljob.observability.series`.

:class:`FljobMetricsProcessor` reduces every value across ranks in-band (loss, gradient
norm, optimizer statistics, data wait, peak memory) before rank 0 hands its record to
:class:`PrometheusLogger`, one of fljob's metric sinks; only rank 0 exports, so no
multiprocess mode and no ``rank`` label. The registry is the exporter's own (no process or
GC collectors, no ``_created`` series): ``/metrics`` holds the training series only.

Serving follows the backend: Kubernetes scrapes the master pod's ``metrics`` port through the
rendered PodMonitor; on SLURM the job writes a ``file_sd`` target (:mod:`.scrape_target`)
when ``metrics.file_sd_dir`` is set; where nodes cannot be scraped it pushes
(:mod:`.pushgateway`) to ``metrics.pushgateway.url``. The port is ``metrics.port``; when it is
taken (two jobs on one shared node) the exporter binds a free one and announces that one:
its log line ``Prometheus metrics at http://<host>:<port>/metrics``, the file_sd target.

Checkpoint code reports each committed save through :func:`record_checkpoint`.

Environment: ``FLJOB_JOB_NAME`` and ``FLJOB_RUN_ID`` (set by every backend's run script)
give the ``job`` and ``run_id`` labels, defaulting to the spec's name;
``FLJOB_METRICS_LINGER_SECONDS`` keeps ``/metrics`` up that long after training, so that a
slow scrape interval still sees the final values.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from torchtitan.components.metrics import BaseLogger

from fljob.observability import series
from fljob.observability.series import JOB_ENV, RUN_ID_ENV, Series
from fljob.spec.models import JobSpec
from fljob.trainer.metrics import VALIDATION_LOSS, scrape_target
from fljob.trainer.metrics.pushgateway import Pusher

log = logging.getLogger(__name__)

LINGER_ENV = "FLJOB_METRICS_LINGER_SECONDS"

_ACTIVE: PrometheusLogger | None = None


def run_labels(spec: JobSpec) -> tuple[str, str]:
    """``(job, run_id)``: the backend's variables, else the spec's name for both."""
    job = os.environ.get(JOB_ENV) or spec.name
    return job, os.environ.get(RUN_ID_ENV) or job


def _collector(s: Series, registry: CollectorRegistry) -> Gauge | Counter | Histogram:
    if s.kind == "histogram":
        return Histogram(s.name, s.help, s.labels, buckets=s.buckets, registry=registry)
    cls = Counter if s.kind == "counter" else Gauge
    return cls(s.name, s.help, s.labels, registry=registry)


class TrainingMetrics:
    """The catalogue's collectors in a private registry, bound to one run's labels."""

    def __init__(self, job: str, run_id: str) -> None:
        prometheus_client.disable_created_metrics()  # no *_created companions
        self.registry = CollectorRegistry(auto_describe=True)
        self._families = {s.name: _collector(s, self.registry) for s in series.ALL}
        self.run_labels = (job, run_id)
        # Counters and histograms exist from the start at zero, so rate() has a first point.
        for s in series.ALL:
            if s.kind != "gauge" and not s.grouped:
                self._child(s)
        self._child(series.START_TIME).set(time.time())
        self._child(series.DIVERGED).set(0)

    def _child(self, s: Series, group: str | None = None) -> Any:
        return self._families[s.name].labels(*self.run_labels, *(() if group is None else (group,)))

    def observe_step_time(self, seconds: float) -> None:
        self._child(series.STEP_DURATION).observe(seconds)

    def observe(self, record: dict[str, Any], step: int, now: float | None = None) -> None:
        """Export one fljob metrics record (see :mod:`.processor`) of logged ``step``."""
        self._child(series.STEP).set(step)
        self._child(series.LAST_STEP_TIME).set(time.time() if now is None else now)
        self._child(series.CONSUMED_TOKENS).set(record["tokens_seen"])
        self._child(series.TOKENS).inc(record["tokens"])
        self._child(series.TOKENS_PER_SECOND).set(record["tokens_per_s"])
        self._child(series.LOSS).set(record["loss"])  # NaN/inf exported as such: alerts watch them
        self._child(series.LOSS_MAX).set(record["loss_max"])
        self._child(series.GRAD_NORM).set(record["grad_norm"])
        self._child(series.MFU).set(record["mfu_pct"] / 100)
        self._child(series.DATA_WAIT).inc(record["data_wait_s"])
        self._child(series.DEVICE_MEMORY).set(record["memory_bytes"])
        for group, lr in record["lr"].items():
            self._child(series.LEARNING_RATE, group).set(lr)
        for group, stats in record.get("optim", {}).items():
            for stat, value in stats.items():
                if stat in series.OPTIMIZER:  # `lr` is already fljob_learning_rate
                    self._child(series.OPTIMIZER[stat], group).set(value)
        for key, value in record.get("goodput", {}).items():
            self._child(series.GOODPUT[key]).set(value)

    def observe_validation(self, record: dict[str, Any]) -> None:
        """Export one held-out evaluation record (see :mod:`.processor`)."""
        self._child(series.VALIDATION_LOSS).set(record[VALIDATION_LOSS])

    def mark_diverged(self) -> None:
        self._child(series.DIVERGED).set(1)

    def record_checkpoint(self, step: int, seconds: float, size_bytes: int,
                          committed_at: float) -> None:
        self._child(series.CHECKPOINT_SAVE_DURATION).observe(seconds)
        self._child(series.CHECKPOINT_WRITTEN_BYTES).inc(size_bytes)
        self._child(series.CHECKPOINT_SIZE).set(size_bytes)
        self._child(series.CHECKPOINT_STEP).set(step)
        self._child(series.CHECKPOINT_COMMITTED).set(committed_at)

    def exposition(self) -> bytes:
        """The ``/metrics`` text, as Prometheus scrapes it."""
        return prometheus_client.generate_latest(self.registry)


class PrometheusLogger(BaseLogger):
    """fljob sink on rank 0: updates the series and owns the endpoint, target and pusher."""

    def __init__(self, metrics: TrainingMetrics, port: int, file_sd_dir: str | None = None,
                 pusher: Pusher | None = None) -> None:
        self.metrics = metrics
        self._server, self._thread = _serve(metrics.registry, port)
        self.port = self._server.server_port
        self._target = None
        if file_sd_dir:
            job, run_id = metrics.run_labels
            labels = {"job": job, "run_id": run_id}
            if os.environ.get("SLURM_JOB_ID"):
                labels["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
            self._target = scrape_target.target_file(file_sd_dir, job, run_id)
            scrape_target.write_target(self._target, scrape_target.advertised_host(), self.port, labels)
        self._pusher = pusher.start() if pusher else None
        self._closed = False
        atexit.register(self.close)  # exceptions and sys.exit still remove the target

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if VALIDATION_LOSS in metrics:
            self.metrics.observe_validation(metrics)
        else:
            self.metrics.observe(metrics, step)

    def close(self) -> None:
        global _ACTIVE
        if self._closed:
            return
        self._closed = True
        linger = float(os.environ.get(LINGER_ENV) or 0)
        if linger > 0:
            time.sleep(linger)
        if self._pusher:
            self._pusher.stop()
        if self._target:
            scrape_target.remove_target(self._target)
        self._server.shutdown()
        self._server.server_close()
        if _ACTIVE is self:
            _ACTIVE = None


def _serve(registry: CollectorRegistry, port: int) -> tuple[Any, Any]:
    try:
        return prometheus_client.start_http_server(port, registry=registry)
    except OSError as e:  # a shared node where another job holds the port
        server, thread = prometheus_client.start_http_server(0, registry=registry)
        log.warning("metrics.port %d is not free (%s): serving /metrics on port %d instead",
                    port, e, server.server_port)
        return server, thread


def build_prometheus_logger(spec: JobSpec) -> PrometheusLogger:
    """Start rank 0's exporter for ``spec`` (endpoint, and file_sd target or pusher when set)."""
    global _ACTIVE
    job, run_id = run_labels(spec)
    metrics = TrainingMetrics(job, run_id)
    gateway = spec.metrics.pushgateway
    pusher = (Pusher(gateway.url, metrics.registry, job, run_id, gateway.interval_seconds)
              if gateway else None)
    _ACTIVE = PrometheusLogger(metrics, spec.metrics.port, spec.metrics.file_sd_dir, pusher)
    # The port really bound: the local backend's hint, printed before the run, names the
    # spec's port, which another job may hold.
    log.info("Prometheus metrics at http://%s:%d/metrics (job=%s run_id=%s)",
             scrape_target.advertised_host(), _ACTIVE.port, job, run_id)
    return _ACTIVE


def record_checkpoint(step: int, seconds: float, size_bytes: int, committed_at: float) -> None:
    """Report a committed checkpoint: call it after the commit marker is written.

    ``seconds`` from the start of the save to the commit, ``size_bytes`` what the checkpoint
    occupies, ``committed_at`` the Unix time of the commit. Safe on every rank and with
    metrics off: only rank 0's running exporter records it (the others have none).
    """
    if _ACTIVE is not None:
        _ACTIVE.metrics.record_checkpoint(step, seconds, size_bytes, committed_at)
