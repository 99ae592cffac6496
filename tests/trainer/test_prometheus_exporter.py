"""The Prometheus exporter: what /metrics holds, that promtool accepts it, and the
endpoint/target lifecycle (the real-Prometheus test is tests/integration/test_observability.py)."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_train import RUN_TIMEOUT_S, fljob_argv, fljob_env, write_spec

from fljob.observability import series
from fljob.spec.models import JobSpec
from fljob.trainer.metrics import prometheus
from fljob.trainer.metrics.prometheus import (
    TrainingMetrics,
    build_prometheus_logger,
    record_checkpoint,
)

GROUPS = ("embedding", "hidden", "output")
PORTS = (19470, 19471)  # this file's; the integration test uses others


def _record(tokens_seen: int = 4096, loss: float = 6.5, with_optim: bool = True) -> dict:
    record = {
        "loss": loss, "loss_max": loss + 0.2, "grad_norm": 1.5,
        "lr": {g: 1e-3 * (i + 1) for i, g in enumerate(GROUPS)},
        "tokens_per_s": 2000.0, "tokens_seen": tokens_seen, "mfu_pct": 12.5,
        "tokens": 1024, "data_wait_s": 0.25, "memory_bytes": 3 * 2**30,
        "goodput": {"restarts": 2.0, "lost_steps": 7.0, "checkpoint_blocked_s": 12.5,
                    "startup_s": 40.0, "productive_s": 300.0, "wall_s": 400.0, "ratio": 0.75},
    }
    if with_optim:
        stats = {"param_norm": 10.0, "grad_norm": 0.5, "grad_max_abs": 0.1, "update_norm": 0.01,
                 "update_ratio": 0.001, "exp_avg_norm": 0.4, "exp_avg_sq_sqrt_norm": 0.45, "lr": 1e-3}
        record["optim"] = {g: dict(stats) for g in (*GROUPS, "all")}
    return record


def _samples(metrics: TrainingMetrics) -> list:
    text = metrics.exposition().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _value(metrics: TrainingMetrics, name: str, **labels: str) -> float:
    found = [s.value for s in _samples(metrics)
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def _full_metrics() -> TrainingMetrics:
    metrics = TrainingMetrics("tiny", "run-7")
    metrics.observe(_record(), step=10, now=1000.0)
    metrics.observe_step_time(0.3)
    metrics.record_checkpoint(step=10, seconds=4.2, size_bytes=123456, committed_at=990.0)
    metrics.observe_validation({"validation_loss": 6.75, "validation_tokens": 8192,
                                "validation_time_s": 0.2, "elapsed_s": 12.0})
    return metrics


def test_every_catalogued_series_is_exported_with_run_labels_and_bounded_groups():
    samples = _samples(_full_metrics())
    assert {s.name for s in samples} == series.exposed_names()
    for s in samples:
        assert s.labels["job"] == "tiny" and s.labels["run_id"] == "run-7", s
        assert set(s.labels) <= {"job", "run_id", "group", "le"}, s
    groups = {s.labels["group"] for s in samples if "group" in s.labels}
    assert groups == {*GROUPS, "all"}


def test_values_are_in_base_units():
    metrics = _full_metrics()
    assert _value(metrics, "fljob_mfu_ratio") == pytest.approx(0.125)  # 12.5 % -> ratio
    assert _value(metrics, "fljob_device_memory_peak_bytes") == 3 * 2**30
    assert _value(metrics, "fljob_learning_rate", group="hidden") == pytest.approx(2e-3)
    assert _value(metrics, "fljob_optimizer_update_ratio", group="all") == pytest.approx(1e-3)
    assert _value(metrics, "fljob_checkpoint_last_commit_timestamp_seconds") == 990.0
    assert _value(metrics, "fljob_step_duration_seconds_count") == 1
    assert _value(metrics, "fljob_step_duration_seconds_bucket", le="0.5") == 1
    assert _value(metrics, "fljob_step_duration_seconds_bucket", le="0.25") == 0
    assert _value(metrics, "fljob_goodput_ratio") == 0.75
    assert _value(metrics, "fljob_goodput_checkpoint_blocked_seconds") == 12.5


def test_counters_restart_at_zero_while_restored_progress_is_a_gauge():
    first = TrainingMetrics("tiny", "run-7")
    first.observe(_record(tokens_seen=1024), step=1)
    first.observe(_record(tokens_seen=2048), step=2)
    assert _value(first, "fljob_tokens_total") == 2048
    resumed = TrainingMetrics("tiny", "run-7")  # a new process after a restart
    resumed.observe(_record(tokens_seen=3072), step=3)
    assert _value(resumed, "fljob_tokens_total") == 1024
    assert _value(resumed, "fljob_consumed_tokens") == 3072
    assert _value(resumed, "fljob_step") == 3
    assert _value(resumed, "fljob_data_wait_seconds_total") == pytest.approx(0.25)
    # The goodput totals come restored from the checkpoint: gauges, as the record has them.
    assert _value(resumed, "fljob_goodput_restarts") == 2
    assert _value(resumed, "fljob_goodput_lost_steps") == 7


def test_held_out_loss_and_divergence_are_gauges_of_the_run():
    metrics = TrainingMetrics("tiny", "run-7")
    assert _value(metrics, "fljob_diverged") == 0  # from the start, so alerts can compare
    assert "fljob_validation_loss" not in {s.name for s in _samples(metrics)}  # none yet
    metrics.observe_validation({"validation_loss": 5.5, "validation_tokens": 64,
                                "validation_time_s": 0.1, "elapsed_s": 3.0})
    assert _value(metrics, "fljob_validation_loss") == 5.5
    metrics.mark_diverged()
    assert _value(metrics, "fljob_diverged") == 1


def test_non_finite_loss_is_exported_as_is():
    metrics = TrainingMetrics("tiny", "run-7")
    metrics.observe(_record(loss=math.nan, with_optim=False), step=5)
    assert math.isnan(_value(metrics, "fljob_loss"))


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool missing (Debian package prometheus)")
def test_promtool_check_metrics_accepts_the_exposition():
    proc = subprocess.run(["promtool", "check", "metrics"], input=_full_metrics().exposition(), check=False,
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def _spec(tmp_path, port: int) -> JobSpec:
    return JobSpec.model_validate({"name": "tiny", "run_dir": str(tmp_path / "run"),
                                   "metrics": {"port": port, "file_sd_dir": str(tmp_path / "sd")}})


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_endpoint_and_file_sd_target_live_as_long_as_the_exporter(tmp_path, monkeypatch):
    monkeypatch.setenv("FLJOB_JOB_NAME", "tiny")
    monkeypatch.setenv("FLJOB_RUN_ID", "run-7")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("FLJOB_METRICS_HOST", "node017")
    logger = build_prometheus_logger(_spec(tmp_path, PORTS[0]))
    try:
        target = tmp_path / "sd" / "tiny-run-7.json"
        assert json.loads(target.read_text()) == [{
            "targets": [f"node017:{PORTS[0]}"],
            "labels": {"job": "tiny", "run_id": "run-7", "slurm_job_id": "4242"}}]
        assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary left
        logger.log(_record(), step=3)
        record_checkpoint(step=3, seconds=1.5, size_bytes=2048, committed_at=1234.0)
        text = _get(PORTS[0])
        assert 'fljob_step{job="tiny",run_id="run-7"} 3.0' in text
        assert 'fljob_checkpoint_size_bytes{job="tiny",run_id="run-7"} 2048.0' in text
        assert "process_cpu_seconds_total" not in text and "_created" not in text
    finally:
        logger.close()
    assert not target.exists()
    with pytest.raises(OSError):
        _get(PORTS[0])
    record_checkpoint(step=4, seconds=1.0, size_bytes=1, committed_at=1.0)  # no exporter: no-op
    assert prometheus._ACTIVE is None


def test_a_taken_port_falls_back_to_a_free_one_and_announces_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FLJOB_METRICS_HOST", "node017")
    caplog.set_level(logging.INFO, logger=prometheus.__name__)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", PORTS[1]))
        taken.listen()
        logger = build_prometheus_logger(_spec(tmp_path, PORTS[1]))
        try:
            assert logger.port != PORTS[1]
            published = json.loads(next((tmp_path / "sd").glob("*.json")).read_text())
            assert published[0]["targets"] == [f"node017:{logger.port}"]
            assert "fljob_start_time_seconds" in _get(logger.port)
        finally:
            logger.close()
    assert (f"metrics.port {PORTS[1]} is not free" in caplog.text
            and f"serving /metrics on port {logger.port} instead" in caplog.text), caplog.text
    assert f"Prometheus metrics at http://node017:{logger.port}/metrics" in caplog.text


@pytest.mark.slow
def test_a_run_whose_port_is_taken_names_the_port_it_serves_in_its_log_and_file_sd_target(tmp_path):
    """Another process holds metrics.port: the run (through the local backend) serves on a
    free port, and its log line and the file_sd target a SLURM Prometheus reads both name it."""
    sd = tmp_path / "sd"
    targets: set[str] = set()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = write_spec(tmp_path, "adamw", procs=1, steps=4,
                          sections={"metrics": {"port": port, "file_sd_dir": str(sd)}})
        env = {**fljob_env(), "FLJOB_METRICS_HOST": "node017", "FLJOB_METRICS_LINGER_SECONDS": "1"}
        log = tmp_path / "output.log"
        with open(log, "w") as out, subprocess.Popen(
                fljob_argv("submit", "--backend", "local", str(spec)), cwd=tmp_path, env=env,
                stdout=out, stderr=subprocess.STDOUT) as proc:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                for path in sd.glob("*.json"):
                    try:
                        targets.update(*(e["targets"] for e in json.loads(path.read_text())))
                    except (OSError, ValueError):  # removed while read: the run ended
                        pass
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
    output = log.read_text()
    assert proc.wait() == 0, output[-3000:]
    served = {int(p) for p in re.findall(r"Prometheus metrics at http://node017:(\d+)/metrics", output)}
    assert len(served) == 1 and port not in served, output[-3000:]
    assert f"metrics.port {port} is not free" in output
    assert targets == {f"node017:{p}" for p in served}
    assert not list(sd.glob("*.json"))  # removed at the end
