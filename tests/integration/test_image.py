"""The training image, built and run here the way CI does it: no daemon, no registry.

The project's scripts make the base (debootstrap Debian 12 -> local image) and build
docker/Dockerfile on it with the local CPU torch wheel and an offline wheelhouse
(docker/build-image.sh); then the tiny muP training runs inside the image, with no network,
as the image's non-root user, writing into a mounted run folder.

Image storage: FLJOB_CTR_DIR when set (kept, so a rerun reuses the base and the layers),
otherwise a fresh folder removed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PODMAN_LOCAL = DOCKER / "podman-local.sh"
TAG = "localhost/fljob:cpu-test"
# binary -> Debian package that provides it
IMAGE_BINARIES = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}
RUN_OPTIONS = ("--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
STEPS = 12
SPEC = f"""\
name: tiny-image
run_dir: /job/run
model: {{flavor: tiny}}
optimizer: {{name: adopt, lr: 0.003}}
schedule: {{warmup_steps: 2}}
training: {{steps: {STEPS}, local_batch_size: 4, seq_len: 64}}
metrics: {{port: 18591}}
"""


def _which(binary: str) -> str | None:
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")


@pytest.fixture(scope="module")
def image_env():
    """Environment for the scripts, with the image built in it."""
    missing = [b for b in IMAGE_BINARIES if _which(b) is None]
    if missing:
        packages = " ".join(sorted({IMAGE_BINARIES[b] for b in missing}))
        pytest.skip(f"container build tools missing ({', '.join(missing)}): as root, "
                    f"apt-get install {packages}")
    if os.geteuid() != 0:
        pytest.skip("building the base needs root (debootstrap, rootful podman)")
    if not list(Path("/opt/wheels").glob("torch-2.13.0+cpu-cp311-*.whl")) and \
            "FLJOB_TORCH_WHEEL" not in os.environ:
        pytest.skip("no CPU torch wheel in /opt/wheels: set FLJOB_TORCH_WHEEL")

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])
    env.setdefault("PYTHON", sys.executable)
    owned = None
    if "FLJOB_CTR_DIR" not in env:
        owned = env["FLJOB_CTR_DIR"] = tempfile.mkdtemp(prefix="fljob-ctr-", dir="/var/tmp")
    try:
        t0 = time.monotonic()
        proc = subprocess.run([str(DOCKER / "build-image.sh"), TAG], env=env, capture_output=True,
                              text=True, timeout=900, check=False)
        sys.stderr.write(f"\n[image] built in {time.monotonic() - t0:.0f} s:\n"
                         + "".join(f"  {line}\n" for line in proc.stdout.splitlines()
                                   if re.search(r"\bin \d+ s\b", line)))
        assert proc.returncode == 0, (f"docker/build-image.sh failed:\n{proc.stdout[-4000:]}\n"
                                      f"{proc.stderr[-4000:]}")
        yield env
    finally:
        if owned:  # every container ran with --rm, so nothing is mounted: removing the folder is enough
            shutil.rmtree(owned, ignore_errors=True)


def podman(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PODMAN_LOCAL), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def job_dir():
    """A run folder the container's user can write (it is not root)."""
    folder = Path(tempfile.mkdtemp(prefix="fljob-image-job-"))
    folder.chmod(0o777)
    (folder / "spec.yaml").write_text(SPEC)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _metrics(job_dir: Path) -> list[dict]:
    path = job_dir / "run" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _assert_trained(proc: subprocess.CompletedProcess[str], job_dir: Path) -> list[dict]:
    assert proc.returncode == 0, f"training in the image failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = _metrics(job_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.3, f"loss did not fall: {[round(r['loss'], 3) for r in rows]}"
    return rows


def test_image_runs_as_its_non_root_user(image_env):
    user = podman(image_env, "image", "inspect", "--format", "{{.Config.User}}", TAG)
    assert user.returncode == 0 and user.stdout.strip() == "fljob"
    uid = podman(image_env, "run", *RUN_OPTIONS, TAG, "id", "-u")
    assert uid.returncode == 0, uid.stderr
    assert int(uid.stdout.strip()) != 0


def test_entrypoint_is_fljob_train(image_env):
    """`run IMAGE <spec or option>` is `fljob train ...` (here: its help, without training)."""
    proc = podman(image_env, "run", *RUN_OPTIONS, TAG, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fljob train")


def test_launch_trains_two_ranks_as_the_image_user(image_env, job_dir):
    """`fljob launch` (torchrun keeping the trainer's exit code), 2 gloo ranks in one container."""
    proc = podman(image_env, "run", *RUN_OPTIONS, "-v", f"{job_dir}:/job", TAG,
                  "launch", "--nproc-per-node=2", "--", "train", "/job/spec.yaml")
    rows = _assert_trained(proc, job_dir)
    assert rows[0]["tokens"] == 2 * 4 * 64  # two ranks' batches of 4 x 64 tokens
    uid = podman(image_env, "run", *RUN_OPTIONS, TAG, "id", "-u").stdout.strip()
    # The trainer processes wrote their files as the image's user, not as root.
    assert (job_dir / "run" / "metrics.jsonl").stat().st_uid == int(uid) != 0
