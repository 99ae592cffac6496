"""Fixtures for integration tests against real services.

`slurm_cluster` (session): the project's single-node SLURM cluster (tests/infra/slurm.sh).

* FLJOB_SLURM_DIR set and its cluster running: reuse it, leave it running at the end.
* Otherwise start one (in FLJOB_SLURM_DIR when set, else a fresh /tmp/fljob-slurm-* folder,
  removed afterwards), on the default ports when they are free and on free ports otherwise,
  and stop it at the end of the session, every daemon by its PID.
* SLURM not installed: every test that needs it is skipped, naming the missing packages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_SH = REPO / "tests" / "infra" / "slurm.sh"

# binary -> Debian package that provides it
SLURM_BINARIES = {
    "sbatch": "slurm-client", "slurmctld": "slurmctld", "slurmd": "slurmd", "munged": "munge",
    "slurmdbd": "slurmdbd", "mariadbd": "mariadb-server",
}
DEFAULT_PORTS = {"FLJOB_SLURM_CTLD_PORT": 16817, "FLJOB_SLURM_D_PORT": 16818, "FLJOB_SLURM_DBD_PORT": 16819}


def _which(binary: str) -> str | None:
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(SLURM_SH), *args], env=env, capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise RuntimeError(f"tests/infra/slurm.sh {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def slurm_cluster():
    """Environment (a dict) in which sbatch, sacct and `fljob` reach the test cluster."""
    missing = [b for b in SLURM_BINARIES if _which(b) is None]
    if missing:
        packages = sorted({SLURM_BINARIES[b] for b in missing})
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}: Debian packages "
                    f"{' '.join(packages)}); as root run `tests/infra/slurm.sh install`")
    fljob = Path(sys.executable).parent / "fljob"
    if not fljob.exists():
        pytest.fail(f"{fljob} does not exist: install fljob into this Python's environment (pip install -e .)")

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(fljob.parent), env.get("PATH", ""), "/usr/sbin", "/usr/bin"])
    given = os.environ.get("FLJOB_SLURM_DIR")
    reuse = bool(given) and _script(env, "status", check=False).returncode == 0
    owned_dir = None
    if not reuse:
        if not given:
            owned_dir = tempfile.mkdtemp(prefix="fljob-slurm-", dir="/tmp")  # short: unix socket paths
            env["FLJOB_SLURM_DIR"] = owned_dir
        for name, default in DEFAULT_PORTS.items():
            if name not in env:
                env[name] = str(default if _port_free(default) else _free_port())
        t0 = time.monotonic()
        _script(env, "start")
        sys.stderr.write(f"\n[slurm_cluster] started in {env['FLJOB_SLURM_DIR']} in "
                         f"{time.monotonic() - t0:.1f} s\n")
    env["SLURM_CONF"] = str(Path(env["FLJOB_SLURM_DIR"]) / "etc" / "slurm.conf")
    try:
        yield env
    finally:
        if not reuse:
            t0 = time.monotonic()
            _script(env, "clean" if owned_dir else "stop", check=False)
            sys.stderr.write(f"\n[slurm_cluster] stopped in {time.monotonic() - t0:.1f} s\n")
