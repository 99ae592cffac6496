"""`fljob train` end to end on the CPU: every optimizer learns, on 1 and on 2 processes, the
metrics file records every step, and a preemption signal stops the run with the requeue code.

Each run is a real subprocess (torchtitan's Trainer, gloo process group, the bundled text
prepared into the run folder), kept a few seconds long by a short sequence and batch.
Measured on 2 shared cores: about 9 s per 1-process run, 25 s per 2-process run (start-up
dominates), so the ten training runs cost a bit over 2.5 minutes of CI. All five optimizers
run on 2 processes too, because each one applies its own foreach update to FSDP2's DTensor
shards: an op that one of them uses and gloo FSDP lacks would pass on 1 process.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

import pytest
from ports import free_port

pytest.importorskip("torchtitan", reason="torchtitan (the trainer extra) is not installed")

from fljob.exitcodes import REQUEUE
from fljob.trainer.checkpoint.store import COMMIT_MARKER, LATEST, step_name
from fljob.trainer.model.mup import GROUP_NAMES
from fljob.trainer.optim import OPTIMIZERS

REPO = Path(__file__).resolve().parents[2]
STEPS = 50
OPTIMIZER_INTERVAL = 10
# Untrained, the loss is about ln(vocab) = 9.0 nats; 50 steps at lr 3e-3 reach about 6.3 with
# every optimizer. A 1-nat fall of the mean loss is far beyond step-to-step noise (~0.2).
LOSS_FALL_NATS = 1.0
RUN_TIMEOUT_S = 300
STAT_KEYS = {"param_norm", "grad_norm", "grad_max_abs", "update_norm", "update_ratio",
             "exp_avg_norm", "exp_avg_sq_sqrt_norm"}


def write_spec(tmp_path: Path, optimizer: str, procs: int, steps: int = STEPS) -> Path:
    """A tiny-flavor spec whose run folder is ``tmp_path/run``."""
    spec = {
        "name": f"train-{optimizer.replace('_', '-')}-{procs}p",
        "run_dir": str(tmp_path / "run"),
        "resources": {"procs_per_node": procs},
        "model": {"flavor": "tiny", "mup": True},
        "optimizer": {"name": optimizer, "lr": 3e-3},
        "schedule": {"warmup_steps": 5},
        "training": {"steps": steps, "local_batch_size": 4, "seq_len": 32, "device": "cpu"},
        "metrics": {"optimizer_interval": OPTIMIZER_INTERVAL, "port": free_port()},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def fljob_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fljob.cli", *args]


def fljob_env() -> dict[str, str]:
    """`fljob launch` starts each worker as `fljob` from PATH: this interpreter's."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(REPO)}


def run_fljob(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(fljob_argv(*args), check=False, capture_output=True, text=True, cwd=cwd,
                          env=fljob_env(), timeout=RUN_TIMEOUT_S)


def read_metrics(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "run" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_records(records: list[dict[str, Any]], steps: int) -> None:
    """One record per step (log_interval 1), complete, with optimizer stats on the interval."""
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["tokens_per_s"] > 0
        assert set(r["lr"]) <= set(GROUP_NAMES) and {"embedding", "hidden"} <= set(r["lr"])
        assert all(lr > 0 for lr in r["lr"].values())
        on_interval = r["step"] % OPTIMIZER_INTERVAL == 0
        assert ("optim" in r) == on_interval, r["step"]
        if on_interval:
            assert set(r["optim"]) == set(r["lr"]) | {"all"}
            for group, stats in r["optim"].items():
                expected = STAT_KEYS if group == "all" else STAT_KEYS | {"lr"}
                assert set(stats) == expected, group
                assert all(math.isfinite(v) for v in stats.values()), group
                assert stats["param_norm"] > 0 and stats["update_norm"] > 0, group
            # "all" sums the groups' squares: its norm is the root of their squared norms.
            groups = [g for g in r["optim"] if g != "all"]
            total = math.sqrt(sum(r["optim"][g]["param_norm"] ** 2 for g in groups))
            assert r["optim"]["all"]["param_norm"] == pytest.approx(total, rel=1e-9)
            for g in groups:
                assert r["optim"][g]["lr"] == pytest.approx(r["lr"][g])


def check_loss_falls(records: list[dict[str, Any]]) -> None:
    first, last = mean(r["loss"] for r in records[:5]), mean(r["loss"] for r in records[-5:])
    assert last < first - LOSS_FALL_NATS, f"mean loss {first:.3f} (first 5) -> {last:.3f} (last 5)"


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_train_one_process(tmp_path: Path, optimizer: str) -> None:
    spec = write_spec(tmp_path, optimizer, procs=1)
    result = run_fljob("train", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path)
    check_records(records, STEPS)
    check_loss_falls(records)
    assert f"step {STEPS}/{STEPS}" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_train_two_processes_through_the_local_backend(tmp_path: Path, optimizer: str) -> None:
    spec = write_spec(tmp_path, optimizer, procs=2)
    result = run_fljob("submit", "--backend", "local", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_metrics(tmp_path)
    check_records(records, STEPS)
    check_loss_falls(records)
    # Two ranks ran FSDP over gloo: torchtitan logs the global batch of both.
    assert "global batch size 8" in result.stdout


def _wait_for_records(tmp_path: Path, proc: subprocess.Popen, log: Path, count: int) -> int:
    """Block until the run has logged ``count`` steps; return how many it has logged."""
    path = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was signalled (exit code "
                                 f"{proc.returncode}):\n{log.read_text()[-3000:]}")
        if path.exists():
            logged = len([line for line in path.read_text().splitlines() if line.endswith("}")])
            if logged >= count:
                return logged
        time.sleep(0.1)
    raise AssertionError(f"no {count} logged steps within {RUN_TIMEOUT_S} s")


@pytest.mark.slow
@pytest.mark.parametrize(("how", "signum", "procs"), [
    ("launch", signal.SIGUSR2, 2),  # SLURM: --signal=B:USR2@grace reaches the launcher
    ("submit", signal.SIGTERM, 1),  # Kubernetes / Ctrl-C: the local backend forwards SIGTERM
], ids=["sigusr2-launch-2procs", "sigterm-submit-1proc"])
def test_preemption_signal_stops_after_the_step_in_flight_with_requeue_code(
        tmp_path: Path, how: str, signum: signal.Signals, procs: int) -> None:
    total = 100_000  # far more than the test waits for: only the signal can end the run
    spec = write_spec(tmp_path, "adopt", procs=procs, steps=total)
    if how == "launch":
        argv = fljob_argv("launch", "--standalone", "--nnodes=1", f"--nproc-per-node={procs}",
                          "--", "train", str(spec))
    else:
        argv = fljob_argv("submit", "--backend", "local", str(spec))
    log = tmp_path / "output.log"  # a file, not a pipe: a full pipe would stall the run
    with open(log, "w") as out, subprocess.Popen(
            argv, cwd=tmp_path, env=fljob_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True) as proc:
        try:
            seen = _wait_for_records(tmp_path, proc, log, count=3)
            proc.send_signal(signum)
            proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:  # only on failure: stop the run we started, all its ranks
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log.read_text()
    assert proc.returncode == REQUEUE, output[-3000:]
    stopped = re.findall(r"Preemption requested: stopping after step (\d+)", output)
    # Every rank logs where it stops (a WARNING), and all agree: the stop is collective.
    assert len(stopped) == procs and len(set(stopped)) == 1, output[-3000:]
    last = int(stopped[0])
    assert seen <= last < total
    # The step in flight finished and was logged; no step after it began.
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, last + 1))
    # ... and it is the committed checkpoint the requeued job will resume from.
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / step_name(last) / COMMIT_MARKER).is_file()
    assert (checkpoints / LATEST).read_text().strip() == step_name(last)
