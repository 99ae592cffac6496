"""Prometheus alert rules for fljob runs, generated from the series catalogue.

``configs/prometheus/alerts.yml`` is :func:`alert_rules_text` with the default
:class:`AlertThresholds` (a test keeps it current; ``configs/prometheus/alerts_test.yml``
holds its ``promtool test rules`` cases). Load it through ``rule_files`` in Prometheus, or
wrap the group in a PrometheusRule on Kubernetes.

Every rule keys on ``job`` and ``run_id``, so one firing alert names one run:

* FljobLossNotFinite: the exported loss is NaN or infinite (the exporter passes them on).
* FljobDiverged: the trainer stopped the run on a non-finite loss or gradient norm (also on
  steps it does not log). It exits soon after, so this fires only where Prometheus scrapes
  the run in between (a short scrape interval, ``FLJOB_METRICS_LINGER_SECONDS``); the exit
  code (3) and the run summary record it in any case.
* FljobNoStepProgress: no logged step for N minutes; before the first step, N minutes since
  the exporter started (a hang in start-up or the first collective counts too).
* FljobThroughputDrop: tokens/s below a fraction of the run's own median of the last hour.
* FljobCheckpointStale: the last committed checkpoint is older than the threshold, or the
  process has run that long without committing one.
* FljobTargetDown: a scrape target that exported fljob series in the last hour is down (a
  run that ends cleanly removes its target, so this means killed or unreachable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from fljob.observability import series as s

GROUP_NAME = "fljob-training"


@dataclass(frozen=True)
class AlertThresholds:
    no_progress_minutes: int = 15
    throughput_drop_ratio: float = 0.5
    """Alert below this fraction of the last hour's median tokens/s."""
    checkpoint_max_age_minutes: int = 120
    target_down_minutes: int = 2


def _rule(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description}}


def alert_rules(t: AlertThresholds = AlertThresholds()) -> dict[str, Any]:
    """The rule file as data."""
    loss, last_step, start = s.LOSS.name, s.LAST_STEP_TIME.name, s.START_TIME.name
    diverged = s.DIVERGED.name
    tps, committed = s.TOKENS_PER_SECOND.name, s.CHECKPOINT_COMMITTED.name
    progress_s = t.no_progress_minutes * 60
    ckpt_s = t.checkpoint_max_age_minutes * 60
    run = "{{ $labels.job }} run {{ $labels.run_id }}"
    rules = [
        _rule("FljobLossNotFinite", f"{loss} != {loss} or abs({loss}) == +Inf", "0m", "critical",
              f"{run}: loss is {{{{ $value }}}}",
              "The training loss is NaN or infinite: the run is diverging or a batch is corrupt. "
              "Stop it and resume from the last good checkpoint with a lower learning rate."),
        _rule("FljobDiverged", f"{diverged} == 1", "0m", "critical",
              f"{run}: diverged, the trainer stopped it",
              "The loss or gradient norm became NaN or infinite and the trainer stopped the run "
              "(exit code 3) without checkpointing that step. Lower optimizer.lr, add warm-up, "
              "clip gradients or train in float32, then resume from the last checkpoint or "
              "start over."),
        _rule("FljobNoStepProgress",
              f"time() - ({last_step} or {start}) > {progress_s}", "0m", "critical",
              f"{run}: no step for {t.no_progress_minutes} minutes",
              "No training step was logged (or none since start-up): the job is hung, e.g. in "
              "a collective or the data loader. Check the rank logs and py-spy dumps."),
        _rule("FljobThroughputDrop",
              f"{tps} < {t.throughput_drop_ratio} * quantile_over_time(0.5, {tps}[1h])", "10m",
              "warning", f"{run}: tokens/s fell below {t.throughput_drop_ratio:.0%} of its 1 h median",
              "Throughput dropped: a slow node, data stalls (see the data wait panel), or thermal "
              "throttling."),
        _rule("FljobCheckpointStale",
              f"time() - {committed} > {ckpt_s} or "
              f"(time() - {start} > {ckpt_s} unless on (job, run_id) {committed})", "0m", "warning",
              f"{run}: no checkpoint committed for {t.checkpoint_max_age_minutes} minutes",
              "A preemption now would lose that much training. Check checkpoint errors in the "
              "log and the object store."),
        _rule("FljobTargetDown",
              f"up == 0 and on (job, instance) max_over_time({start}[1h])",
              f"{t.target_down_minutes}m", "critical", "{{ $labels.job }} on {{ $labels.instance }} "
              "cannot be scraped",
              "A target that exported fljob series in the last hour is down: the job was killed "
              "without cleaning up, or its node is unreachable."),
    ]
    return {"groups": [{"name": GROUP_NAME, "rules": rules}]}


def alert_rules_text(t: AlertThresholds = AlertThresholds()) -> str:
    header = ("# Generated by fljob.observability.alerts: do not edit; regenerate with\n"
              "#   FLJOB_UPDATE_GOLDEN=1 pytest tests/test_observability_configs.py\n")
    return header + yaml.safe_dump(alert_rules(t), sort_keys=False, width=100)
