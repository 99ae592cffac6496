"""The local backend for real: render run.sh, run it through `fljob launch` (torchrun), 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("torch", reason="torch (the trainer extra) is not installed")


def fljob(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fljob.cli", *args], capture_output=True, text=True, check=False,
                          cwd=cwd, env=env, timeout=180)


@pytest.mark.slow
def test_local_doctor_two_ranks_rendezvous(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: local-doctor\nrun_dir: run\nresources: {procs_per_node: 2}\nenv: {GREETING: \"it's $(not run)\"}\n")
    result = fljob("submit", "--backend", "local", "--doctor", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = (tmp_path / "run").resolve()
    assert result.stdout.strip().splitlines()[-1] == f"local://{run_dir}"
    for rank in (0, 1):
        assert f"fljob doctor: rank={rank} world_size=2" in result.stdout
    assert result.stdout.count("expected=1 ok") == 2

    status = fljob("status", f"local://{run_dir}", cwd=tmp_path)
    assert status.stdout.strip() == f"local://{run_dir} COMPLETED exit_code=0 logs={run_dir}/train.log"
    record = json.loads(fljob("status", "--json", f"local://{run_dir}", cwd=tmp_path).stdout)
    assert (record["state"], record["exit_code"], record["logs"]) == ("COMPLETED", 0, f"{run_dir}/train.log")
    logs = fljob("logs", f"local://{run_dir}", cwd=tmp_path)
    assert logs.stdout.count("expected=1 ok") == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["local.json", "run.sh", "spec.yaml", "train.log"]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: local-dry\nrun_dir: run\n")
    result = fljob("submit", "--backend", "local", "--dry-run", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = (tmp_path / "run").resolve()
    assert result.stdout.splitlines()[1:] == [f"would write into {run_dir}:", "  run.sh", "  spec.yaml",
                                              f"then run: bash {run_dir}/run.sh", f"handle: local://{run_dir}"]
    assert not (tmp_path / "run").exists()


def test_failed_run_keeps_its_exit_code_and_status(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    # The referenced variable is not set, so run.sh stops before training, with exit code 2.
    spec.write_text("name: local-fail\nrun_dir: run\nsecret_env: {HF_TOKEN: {env: FLJOB_TEST_UNSET_VAR}}\n")
    result = fljob("submit", "--backend", "local", "--doctor", str(spec), cwd=tmp_path)
    assert result.returncode == 2
    assert "FLJOB_TEST_UNSET_VAR is not set" in result.stdout
    run_dir = (tmp_path / "run").resolve()
    assert "failed with exit code 2" in result.stderr
    assert fljob("status", f"local://{run_dir}", cwd=tmp_path).stdout.split()[1:3] == ["FAILED", "exit_code=2"]


def test_handles_are_checked(tmp_path: Path) -> None:
    for bad in ("1234", "slurm://abc", "k8s://only-name", "local://"):
        result = fljob("status", bad, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, bad
    missing = fljob("status", f"local://{tmp_path}/nothing", cwd=tmp_path)
    assert missing.returncode == 2 and "no local run there" in missing.stderr


# --------------------------------------------------------------------------- state files


def _state_dir(tmp_path: Path, content: bytes) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "local.json").write_bytes(content)
    (folder / "train.log").write_text("log\n")
    return folder


@pytest.mark.parametrize("content", [
    b"not json", b"\xff\xfe", b"[]", b'{"pid": "123", "exit_code": null}', b'{"pid": -1, "exit_code": null}',
    b'{"pid": 1, "exit_code": "0"}', b'{"pid": true, "exit_code": null}', b'{"pid": 1' + b" " * 100_000 + b"}",
])
def test_damaged_state_files_are_refused_in_one_line(tmp_path: Path, content: bytes) -> None:
    folder = _state_dir(tmp_path, content)
    for command in ("status", "logs", "cancel"):
        result = fljob(command, f"local://{folder}", cwd=tmp_path)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        assert "is not a state file fljob wrote" in result.stderr, result.stderr


def test_a_state_file_naming_another_process_never_signals_it(tmp_path: Path) -> None:
    """A recorded pid that is alive but not a process fljob started for this folder: status says
    the run is gone, cancel refuses, and the process lives on."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        stat = Path(f"/proc/{other.pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # even its true start time
        folder = _state_dir(tmp_path, json.dumps({"pid": other.pid, "start_ticks": ticks, "exit_code": None}).encode())
        status = fljob("status", f"local://{folder}", cwd=tmp_path)
        assert status.returncode == 0 and status.stdout.split()[1] == "UNKNOWN", status.stdout
        cancel = fljob("cancel", f"local://{folder}", cwd=tmp_path)
        assert cancel.returncode == 2 and "is not running" in cancel.stderr
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()


def test_very_long_and_odd_handles_are_one_line_errors(tmp_path: Path) -> None:
    for handle in ("local://" + "x" * 5000, "local:///etc/passwd", "local:///proc/1"):
        result = fljob("status", handle, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, handle
        assert len(result.stderr) < 800, result.stderr


# --------------------------------------------------------------------------- Ctrl-C and sweeps


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_75_without_tracebacks(tmp_path: Path) -> None:
    """SIGINT to the whole foreground process group, as a terminal sends it."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: ctrl-c\nrun_dir: run\ntraining: {steps: 100000, local_batch_size: 2, seq_len: 32}\n"
                    "metrics: {enabled: false}\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fljob.cli", "submit", "--backend", "local", str(spec)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and "/100000" in line:
            os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: every process of the group
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 75, "".join(lines)
    out = "".join(lines)
    assert "Traceback" not in out and "submit again to resume" in out
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "latest").exists() or any((run_dir / "checkpoints").glob("step-*")), out
    status = fljob("status", f"local://{run_dir.resolve()}", cwd=tmp_path)
    assert status.stdout.split()[1:3] == ["PREEMPTED", "exit_code=75"], status.stdout


SWEEP = """\
name: tiny-sweep
run_dir: {run_dir}
training: {{steps: 3, local_batch_size: 2, seq_len: 32, validation_interval: 3, validation_batches: 2}}
metrics: {{enabled: false}}
sweep:
  grid:
    model.width: [64, 128]
    optimizer.lr: [0.003, 0.01]
  name_format: "{{name}}-w{{width}}-{{index}}"
  parallel: 2
"""


@pytest.mark.slow
def test_local_sweep_runs_every_trial_two_at_a_time_and_resubmitting_skips_them(tmp_path: Path) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SWEEP.format(run_dir=tmp_path / "sweep"))
    result = fljob("submit", "--backend", "local", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = tmp_path / "sweep"
    names = ["tiny-sweep-w64-0", "tiny-sweep-w64-1", "tiny-sweep-w128-2", "tiny-sweep-w128-3"]
    assert sorted(line.split()[3] for line in result.stdout.splitlines() if line.endswith(")") and "started" in line) \
        == sorted(names)
    assert result.stdout.count(" COMPLETED in ") == 4
    # Two at a time: while the first two ran, no third started.
    order = [line.split()[4] for line in result.stdout.splitlines() if line.startswith("fljob: trial ")]
    assert order[:2] == ["started", "started"] and order[2] == "COMPLETED"
    status = fljob("status", f"local://{folder}", cwd=tmp_path)
    lines = status.stdout.splitlines()
    assert lines[0] == f"local://{folder} SWEEP tiny-sweep: 4 trials: 4 COMPLETED"
    assert [line.split()[1:4] for line in lines[2:]] == [[n, "COMPLETED", "3/3"] for n in names]
    record = json.loads(fljob("status", "--json", f"local://{folder}", cwd=tmp_path).stdout)
    assert [t["name"] for t in record["trials"]] == names and all(t["loss"] > 0 for t in record["trials"])
    for name, width in zip(names, (64, 64, 128, 128), strict=True):
        trial_spec = yaml.safe_load((folder / name / "spec.yaml").read_text())
        assert trial_spec["model"]["width"] == width and trial_spec["trial"]["sweep"] == "tiny-sweep"
    again = fljob("submit", "--backend", "local", str(spec), cwd=tmp_path)
    assert again.returncode == 0 and "4 trials (4 already done)" in again.stdout, again.stdout
    assert "started" not in again.stdout
    logs = fljob("logs", f"local://{folder}", cwd=tmp_path)
    assert logs.returncode == 2 and "is a sweep" in logs.stderr

    report = fljob("sweep", "report", str(folder), "-o", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "compared by the final validation loss" in report.stdout
    assert "verdict: muP: optimum moved" in report.stdout and "from width 64 to 128" in report.stdout
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [t["name"] for t in data["trials"]] == names
    assert all(t["state"] == "completed" and t["validation_loss"] > 0 and not t["diverged"] for t in data["trials"])
    assert [t["overrides"] for t in data["trials"]][1] == {"model.width": 64, "optimizer.lr": 0.01}
    assert data["widths"] == [64, 128] and data["learning_rates"] == [0.003, 0.01]
    assert (tmp_path / "report" / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = fljob("validate", str(tmp_path / "report" / "best.yaml"), cwd=tmp_path)
    assert best.returncode == 0, best.stderr
