"""Every write fails in one line naming the path and the cause, exit 2, nothing half-written.

Read-only and full disks are real: small tmpfs mounts (mounting needs root with
CAP_SYS_ADMIN, as CI has; the tests skip saying so otherwise). A path that is a file, or a
folder below a file, needs no mount.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEP = "name: w\nsweep: {grid: {optimizer.lr: [0.001, 0.002, 0.004, 0.008]}}\n"


def fljob(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fljob.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    """mount(size, read_only) -> a fresh tmpfs folder, unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: str = "1m", read_only: bool = False) -> Path:
        point = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_render_into_a_read_only_folder(tmp_path: Path, tmpfs) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: w\n")
    out = tmpfs(read_only=True)
    one_line_error(fljob("render", "-b", "slurm", str(spec), "-o", str(out / "job"), cwd=tmp_path),
                   f"cannot write {out}/job", "read-only")


def test_render_into_a_path_that_is_a_file_or_below_one(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: w\n")
    blocker = tmp_path / "file"
    blocker.write_text("keep me\n")
    one_line_error(fljob("render", "-b", "local", str(spec), "-o", str(blocker), cwd=tmp_path), str(blocker),
                   "a part of the path is a file")
    one_line_error(fljob("render", "-b", "local", str(spec), "-o", str(blocker / "sub" / "deeper"), cwd=tmp_path),
                   "a part of the path is a file")
    assert blocker.read_text() == "keep me\n"


def test_a_full_disk_leaves_nothing_behind(tmp_path: Path, tmpfs) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SWEEP)
    out = tmpfs(size="12k")  # room for a file or two of the sweep's ten
    done = fljob("render", "-b", "slurm", str(spec), "-o", str(out / "sweep"), cwd=tmp_path)
    one_line_error(done, "no space left on the device", "nothing was written")
    assert list(out.iterdir()) == []  # no file, no temp file, no folder


def test_submit_into_a_read_only_run_dir(tmp_path: Path, tmpfs) -> None:
    out = tmpfs(read_only=True)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: w\nrun_dir: {out}/run\n")
    one_line_error(fljob("submit", "-b", "local", str(spec), cwd=tmp_path), "read-only")
