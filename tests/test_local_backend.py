"""The local backend for real: render run.sh, run it through `fljob launch` (torchrun), 2 ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("torch", reason="torch (the trainer extra) is not installed")


def fljob(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fljob.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=180)


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
    assert status.stdout.strip() == f"local://{run_dir} COMPLETED"
    logs = fljob("logs", f"local://{run_dir}", cwd=tmp_path)
    assert logs.stdout.count("expected=1 ok") == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["local.json", "run.sh", "spec.yaml", "train.log"]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: local-dry\nrun_dir: run\n")
    result = fljob("submit", "--backend", "local", "--dry-run", str(spec), cwd=tmp_path)
    assert result.returncode == 0 and "would write run.sh, spec.yaml" in result.stdout
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
    assert fljob("status", f"local://{run_dir}", cwd=tmp_path).stdout.strip().endswith("FAILED (exit code 2)")


def test_handles_are_checked(tmp_path: Path) -> None:
    for bad in ("1234", "slurm://abc", "k8s://only-name", "local://"):
        result = fljob("status", bad, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, bad
    missing = fljob("status", f"local://{tmp_path}/nothing", cwd=tmp_path)
    assert missing.returncode == 2 and "no local run there" in missing.stderr
