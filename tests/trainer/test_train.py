"""`fljob train` end to end on the CPU: every optimizer learns, on 1 and on 2 processes, the
metrics file records every step, a preemption signal stops the run with the requeue code,
held-out evaluations change nothing in training and reach every report, and a diverging run
stops on every rank with the diverged code and only good checkpoints.

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
import urllib.request
from pathlib import Path
from statistics import mean
from typing import Any

import pytest
from ports import free_port

pytest.importorskip("torchtitan", reason="torchtitan (the trainer extra) is not installed")

from fljob.exitcodes import DIVERGED, REQUEUE
from fljob.spec import load_spec
from fljob.summary import read_summary
from fljob.trainer.checkpoint.store import COMMIT_MARKER, LATEST, step_name
from fljob.trainer.model.flavors import TINY_FLAVOR, get_flavor
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


def write_spec(tmp_path: Path, optimizer: str, procs: int, steps: int = STEPS,
               sections: dict[str, dict[str, Any]] | None = None) -> Path:
    """A tiny-flavor spec whose run folder is ``tmp_path/run``; ``sections`` update its
    sections (``{"training": {"validation_interval": 5}}``)."""
    spec: dict[str, Any] = {
        "name": f"train-{optimizer.replace('_', '-')}-{procs}p",
        "run_dir": str(tmp_path / "run"),
        "resources": {"procs_per_node": procs},
        "model": {"flavor": "tiny", "mup": True},
        "optimizer": {"name": optimizer, "lr": 3e-3},
        "schedule": {"warmup_steps": 5},
        "training": {"steps": steps, "local_batch_size": 4, "seq_len": 32, "device": "cpu"},
        "metrics": {"optimizer_interval": OPTIMIZER_INTERVAL, "port": free_port()},
    }
    for section, fields in (sections or {}).items():
        spec[section] = {**spec.get(section, {}), **fields}
    tmp_path.mkdir(parents=True, exist_ok=True)
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


@pytest.mark.slow
def test_held_out_evaluations_change_nothing_in_training_and_reach_every_report(
        tmp_path: Path) -> None:
    """The same run with and without validation: bitwise the same training; the evaluations
    at every interval and after the last step in metrics.jsonl, on stdout and in summary.json."""
    steps, batches = 12, 3
    plain = write_spec(tmp_path / "plain", "adamw", procs=1, steps=steps)
    evaluated = write_spec(tmp_path / "evaluated", "adamw", procs=1, steps=steps, sections={
        "training": {"validation_interval": 5, "validation_batches": batches}})
    for spec in (plain, evaluated):
        result = run_fljob("train", str(spec), cwd=spec.parent)
        assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout

    def training(records: list[dict[str, Any]]) -> list[tuple]:
        return [(r["step"], r["loss"], r["grad_norm"], r["tokens_seen"]) for r in records
                if "loss" in r]

    reference, records = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "evaluated")
    assert training(records) == training(reference)  # bitwise: same data order, same model
    assert not any("validation_loss" in r for r in reference)
    held = [r for r in records if "validation_loss" in r]
    assert [r["step"] for r in held] == [5, 10, 12]
    # Each evaluation record follows the training record of its step.
    assert [records[records.index(r) - 1]["step"] for r in held] == [5, 10, 12]
    assert all(r["validation_tokens"] == batches * 4 * 32 for r in held)  # batches x batch x seq
    assert all(math.isfinite(r["validation_loss"]) for r in held)
    assert held[-1]["validation_loss"] < held[0]["validation_loss"] - 0.3  # it learned
    for r in held:
        assert re.search(rf"^step +{r['step']}/{steps}  validation loss "
                         rf"{r['validation_loss']:.4f}  {r['validation_tokens']:,} tokens", stdout,
                         re.MULTILINE), stdout

    summary = read_summary(tmp_path / "evaluated" / "run")
    assert summary is not None
    last = [r for r in records if "loss" in r][-1]
    tiny = get_flavor(TINY_FLAVOR)
    assert (summary.state, summary.step, summary.steps, summary.diverged) == (
        "completed", steps, steps, False)
    assert summary.train_loss == last["loss"] and summary.tokens_seen == last["tokens_seen"]
    assert (summary.validation_loss, summary.validation_step) == (held[-1]["validation_loss"], steps)
    assert (summary.width, summary.depth) == (tiny.dim, tiny.n_layers)
    assert summary.params is not None and summary.params > 1e6  # the tiny model has 1.25M
    assert summary.trial is None and summary.elapsed_s > 0
    assert summary.spec == load_spec(evaluated).model_dump(mode="json")
    plain_summary = read_summary(tmp_path / "plain" / "run")
    assert plain_summary is not None and plain_summary.validation_loss is None


@pytest.mark.slow
def test_a_diverging_run_stops_on_every_rank_with_its_own_exit_code_and_good_checkpoints(
        tmp_path: Path) -> None:
    """An absurd learning rate on 2 ranks: the gradient norm overflows at a step that is not
    logged; both ranks stop there before saving it, with one line naming the step and the
    fixes, the summary and Prometheus say diverged, and `fljob status` tells it apart."""
    spec = write_spec(tmp_path, "adamw", procs=2, steps=30, sections={
        "optimizer": {"lr": 1e30, "grad_clip_norm": None},
        "training": {"log_interval": 3, "validation_interval": 10, "validation_batches": 1},
        "checkpoint": {"interval_steps": 1, "keep_latest": 100}})
    port = json.loads(spec.read_text())["metrics"]["port"]
    log = tmp_path / "output.log"
    diverged_gauge = None
    with open(log, "w") as out, subprocess.Popen(
            fljob_argv("submit", "--backend", "local", str(spec)), cwd=tmp_path,
            env={**fljob_env(), "FLJOB_METRICS_LINGER_SECONDS": "3"},  # /metrics outlives the run
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True) as proc:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    found = re.search(r"^fljob_diverged\{.*\} (\S+)$", r.read().decode(), re.MULTILINE)
                diverged_gauge = float(found.group(1)) if found else diverged_gauge
            except OSError:
                pass
            time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert proc.returncode == DIVERGED, output[-3000:]
    lines = re.findall(r"Diverged at step (\d+): (.*)", output)
    assert len(lines) == 1, output[-3000:]  # one line, from rank 0
    step = int(lines[0][0])
    assert "the gradient norm is not finite" in lines[0][1] and "lower optimizer.lr" in lines[0][1]
    assert step % 3 and step > 1, step  # not a logged step: found by the per-step check
    assert diverged_gauge == 1.0
    # Nothing of the diverged step or after it was logged, evaluated or saved.
    records = read_metrics(tmp_path)
    assert records and all(r["step"] < step for r in records)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [
        step_name(s) for s in range(1, step)]
    assert all((checkpoints / step_name(s) / COMMIT_MARKER).is_file() for s in range(1, step))
    assert (checkpoints / LATEST).read_text().strip() == step_name(step - 1)
    summary = read_summary(tmp_path / "run")
    assert summary is not None
    assert (summary.state, summary.diverged, summary.step) == ("diverged", True, step)
    status = run_fljob("status", f"local://{tmp_path / 'run'}", cwd=tmp_path)
    assert "DIVERGED" in status.stdout, status.stdout + status.stderr
