"""Fixtures for integration tests against real services, each started by its own script.

`slurm_cluster`, `s3_server` and `prometheus_stack` (session scope) run tests/infra/slurm.sh,
s3.sh and prometheus.sh the same way:

* the script's state folder variable (FLJOB_SLURM_DIR, FLJOB_S3_DIR, FLJOB_PROM_DIR) set and
  its server running: reuse it, leave it running at the end;
* otherwise start one (in that folder when set, else a fresh /tmp/fljob-* folder, removed
  afterwards), on the default ports when free and on free ports otherwise, and stop it at
  the end of the session, every daemon by its PID;
* not installed: every test that needs it is skipped, naming the missing Debian packages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port, port_free

REPO = Path(__file__).resolve().parents[2]


def _which(binary: str) -> str | None:
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")


@dataclass(frozen=True)
class ServerScript:
    """One of tests/infra/<name>.sh: what it needs installed, where it keeps state, its ports."""

    name: str
    title: str
    binaries: dict[str, str]  # binary -> Debian package that provides it
    dir_var: str
    ports: dict[str, int]

    def run(self, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["bash", str(REPO / "tests" / "infra" / f"{self.name}.sh"), *args], env=env,
                              capture_output=True, text=True, timeout=180, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"tests/infra/{self.name}.sh {' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}")
        return proc

    @contextlib.contextmanager
    def running(self, **settings: str) -> Iterator[dict[str, str]]:
        """The environment in which the server answers; see the module docstring."""
        missing = [b for b in self.binaries if _which(b) is None]
        if missing:
            packages = " ".join(sorted({self.binaries[b] for b in missing}))
            pytest.skip(f"{self.title} is not installed (missing {', '.join(missing)}: Debian packages "
                        f"{packages}); as root run `tests/infra/{self.name}.sh install`")
        env = dict(os.environ, **settings)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/usr/bin"])
        given = os.environ.get(self.dir_var)
        owned_dir = None
        if not given:  # short: unix socket paths live in it
            owned_dir = env[self.dir_var] = tempfile.mkdtemp(prefix=f"fljob-{self.name}-", dir="/tmp")
        reuse = bool(given) and self.run(env, "status", check=False).returncode == 0
        if not reuse:
            for name, default in self.ports.items():
                env.setdefault(name, str(default if port_free(default) else free_port()))
            t0 = time.monotonic()
            self.run(env, "start")
            sys.stderr.write(f"\n[{self.name}] started in {env[self.dir_var]} in {time.monotonic() - t0:.1f} s\n")
        try:
            yield env
        finally:
            if not reuse:
                t0 = time.monotonic()
                self.run(env, "clean" if owned_dir else "stop", check=False)
                sys.stderr.write(f"\n[{self.name}] stopped in {time.monotonic() - t0:.1f} s\n")


SLURM = ServerScript(
    "slurm", "SLURM",
    {"sbatch": "slurm-client", "slurmctld": "slurmctld", "slurmd": "slurmd", "munged": "munge",
     "slurmdbd": "slurmdbd", "mariadbd": "mariadb-server"},
    "FLJOB_SLURM_DIR",
    {"FLJOB_SLURM_CTLD_PORT": 16817, "FLJOB_SLURM_D_PORT": 16818, "FLJOB_SLURM_DBD_PORT": 16819},
)
S3 = ServerScript(
    "s3", "Swift S3",
    {"swift-proxy-server": "swift-proxy", "swift-account-server": "swift-account",
     "swift-container-server": "swift-container", "swift-object-server": "swift-object",
     "swift-ring-builder": "swift", "memcached": "memcached", "curl": "curl"},
    "FLJOB_S3_DIR",
    {"FLJOB_S3_PORT": 18480, "FLJOB_S3_ACCOUNT_PORT": 18481, "FLJOB_S3_CONTAINER_PORT": 18482,
     "FLJOB_S3_OBJECT_PORT": 18483, "FLJOB_S3_MEMCACHED_PORT": 18484},
)
PROMETHEUS = ServerScript(
    "prometheus", "Prometheus",
    {"prometheus": "prometheus", "promtool": "prometheus", "prometheus-pushgateway": "prometheus-pushgateway"},
    "FLJOB_PROM_DIR",
    {"FLJOB_PROM_PORT": 19190, "FLJOB_PUSHGATEWAY_PORT": 19191},
)
S3_TEST_BUCKET = "fljob-test"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """Environment (a dict) in which sbatch, sacct and `fljob` reach the test cluster."""
    fljob = Path(sys.executable).parent / "fljob"
    if not fljob.exists():
        pytest.fail(f"{fljob} does not exist: install fljob into this Python's environment (pip install -e .)")
    with SLURM.running() as env:
        env["PATH"] = os.pathsep.join([str(fljob.parent), env["PATH"]])
        env["SLURM_CONF"] = str(Path(env["FLJOB_SLURM_DIR"]) / "etc" / "slurm.conf")
        yield env


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
        S3.run(self.env, "stop-one", name)

    def start_daemon(self, name: str) -> None:
        S3.run(self.env, "start-one", name)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The Swift S3 server with bucket `fljob-test`, and its endpoint and test credentials."""
    with S3.running() as env:
        for line in S3.run(env, "env").stdout.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value
        server = S3Server(env, S3_TEST_BUCKET)
        client = server.client()
        if S3_TEST_BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=S3_TEST_BUCKET)
        yield server


@pytest.fixture(scope="session")
def prometheus_stack() -> Iterator[dict]:
    """Prometheus (1 s scrapes of a file_sd folder) and a Pushgateway: their URLs and folders."""
    with PROMETHEUS.running(FLJOB_PROM_SCRAPE_INTERVAL="1s") as env:
        state = Path(env["FLJOB_PROM_DIR"])
        yield {"dir": state, "targets": Path(env.get("FLJOB_PROM_TARGETS") or state / "targets"),
               "prometheus": f"http://127.0.0.1:{env['FLJOB_PROM_PORT']}",
               "pushgateway": f"http://127.0.0.1:{env['FLJOB_PUSHGATEWAY_PORT']}"}
