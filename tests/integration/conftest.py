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


# --------------------------------------------------------------------------- S3 (Swift)

S3_SH = REPO / "tests" / "infra" / "s3.sh"
# binary -> Debian package that provides it
SWIFT_BINARIES = {
    "swift-proxy-server": "swift-proxy", "swift-account-server": "swift-account",
    "swift-container-server": "swift-container", "swift-object-server": "swift-object",
    "swift-ring-builder": "swift", "memcached": "memcached", "curl": "curl",
}
S3_DEFAULT_PORTS = {
    "FLJOB_S3_PORT": 18480, "FLJOB_S3_ACCOUNT_PORT": 18481, "FLJOB_S3_CONTAINER_PORT": 18482,
    "FLJOB_S3_OBJECT_PORT": 18483, "FLJOB_S3_MEMCACHED_PORT": 18484,
}
S3_TEST_BUCKET = "fljob-test"


def _s3_script(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(S3_SH), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"tests/infra/s3.sh {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return proc


class S3Server:
    """The running Swift S3 server: its environment (endpoint + test credentials) and the
    script verbs fault tests need (take one daemon down by its PID, bring it back)."""

    def __init__(self, env: dict[str, str], bucket: str) -> None:
        self.env = env
        self.bucket = bucket
        self.endpoint_url = env["AWS_ENDPOINT_URL"]
        self.access_key_id = env["AWS_ACCESS_KEY_ID"]
        self.secret_access_key = env["AWS_SECRET_ACCESS_KEY"]
        self.region = env["AWS_DEFAULT_REGION"]

    def stop_daemon(self, name: str) -> None:
        _s3_script(self.env, "stop-one", name)

    def start_daemon(self, name: str) -> None:
        _s3_script(self.env, "start-one", name)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key)


@pytest.fixture(scope="session")
def s3_server():
    """The project's Swift S3 server (tests/infra/s3.sh) with bucket `fljob-test`.

    * FLJOB_S3_DIR set and its server running: reuse it, leave it running at the end.
    * Otherwise start one (in FLJOB_S3_DIR when set, else a fresh /tmp/fljob-s3-* folder,
      removed afterwards), on the default ports when free and on free ports otherwise, and
      stop it at the end of the session, every daemon by its PID.
    * Swift not installed: every test that needs it is skipped, naming the missing packages.
    """
    missing = [b for b in SWIFT_BINARIES if _which(b) is None]
    if missing:
        packages = sorted({SWIFT_BINARIES[b] for b in missing})
        pytest.skip(f"Swift S3 is not installed (missing {', '.join(missing)}: Debian packages "
                    f"{' '.join(packages)}); as root run `tests/infra/s3.sh install`")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/usr/bin"])
    given = os.environ.get("FLJOB_S3_DIR")
    owned_dir = None
    if not given:
        owned_dir = tempfile.mkdtemp(prefix="fljob-s3-", dir="/tmp")
        env["FLJOB_S3_DIR"] = owned_dir
    reuse = bool(given) and _s3_script(env, "status", check=False).returncode == 0
    if not reuse:
        for name, default in S3_DEFAULT_PORTS.items():
            if name not in env:
                env[name] = str(default if _port_free(default) else _free_port())
        t0 = time.monotonic()
        _s3_script(env, "start")
        sys.stderr.write(f"\n[s3_server] started in {env['FLJOB_S3_DIR']} in {time.monotonic() - t0:.1f} s\n")
    for line in _s3_script(env, "env").stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value
    server = S3Server(env, S3_TEST_BUCKET)
    client = server.client()
    if S3_TEST_BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=S3_TEST_BUCKET)
    try:
        yield server
    finally:
        if not reuse:
            t0 = time.monotonic()
            _s3_script(env, "clean" if owned_dir else "stop", check=False)
            sys.stderr.write(f"\n[s3_server] stopped in {time.monotonic() - t0:.1f} s\n")


# --------------------------------------------------------------------------- Prometheus

PROMETHEUS_SH = REPO / "tests" / "infra" / "prometheus.sh"
PROMETHEUS_BINARIES = {"prometheus": "prometheus", "promtool": "prometheus",
                       "prometheus-pushgateway": "prometheus-pushgateway"}
PROMETHEUS_DEFAULT_PORTS = {"FLJOB_PROM_PORT": 19190, "FLJOB_PUSHGATEWAY_PORT": 19191}


@pytest.fixture(scope="session")
def prometheus_stack(tmp_path_factory):
    """Prometheus (1 s scrapes of a file_sd folder) and a Pushgateway, from tests/infra/prometheus.sh.

    Yields their URLs, the state folder and the targets folder; stops both by PID at the end.
    Skips, naming the Debian packages, where Prometheus is not installed.
    """
    missing = [b for b in PROMETHEUS_BINARIES if _which(b) is None]
    if missing:
        pytest.skip(f"Prometheus is not installed (missing {', '.join(missing)}: Debian packages "
                    f"{' '.join(sorted({PROMETHEUS_BINARIES[b] for b in missing}))}); as root run "
                    "`tests/infra/prometheus.sh install`")
    env = dict(os.environ, FLJOB_PROM_DIR=str(tmp_path_factory.mktemp("prometheus")),
               FLJOB_PROM_SCRAPE_INTERVAL="1s")
    for name, default in PROMETHEUS_DEFAULT_PORTS.items():
        env.setdefault(name, str(default if _port_free(default) else _free_port()))
    env["FLJOB_PROM_TARGETS"] = os.path.join(env["FLJOB_PROM_DIR"], "targets")
    subprocess.run(["bash", str(PROMETHEUS_SH), "start"], env=env, check=True, timeout=60)
    try:
        yield {"dir": Path(env["FLJOB_PROM_DIR"]), "targets": Path(env["FLJOB_PROM_TARGETS"]),
               "prometheus": f"http://127.0.0.1:{env['FLJOB_PROM_PORT']}",
               "pushgateway": f"http://127.0.0.1:{env['FLJOB_PUSHGATEWAY_PORT']}"}
    finally:
        subprocess.run(["bash", str(PROMETHEUS_SH), "stop"], env=env, check=False, timeout=60)
