"""The S3 server the S3 benchmarks run against: the project's Swift S3 (tests/infra/s3.sh).

The one whose environment is exported (``eval "$(tests/infra/s3.sh env)"``), else one started
here in a temp folder on ports 18595-18599, removed (every daemon stopped by its PID) at the
end. Shared by bench/dataloader_s3.py and bench/checkpoint_s3.py.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
S3_SH = REPO / "tests" / "infra" / "s3.sh"
OWN_PORTS = {"FLJOB_S3_PORT": 18595, "FLJOB_S3_ACCOUNT_PORT": 18596,
             "FLJOB_S3_CONTAINER_PORT": 18597, "FLJOB_S3_OBJECT_PORT": 18598,
             "FLJOB_S3_MEMCACHED_PORT": 18599}


@contextmanager
def s3_server() -> Iterator[str]:
    """The exported server, or a throw-away one from tests/infra/s3.sh (stopped by PID).
    Yields a description for the results file; the endpoint and credentials are in
    ``os.environ`` (AWS_* and S3_ENDPOINT_URL) meanwhile."""
    if os.environ.get("S3_ENDPOINT_URL"):
        yield "exported by tests/infra/s3.sh env"
        return
    folder = tempfile.mkdtemp(prefix="fljob-s3-bench-")
    env = {**os.environ, **{k: str(v) for k, v in OWN_PORTS.items()}, "FLJOB_S3_DIR": folder}
    subprocess.run(["bash", str(S3_SH), "start"], env=env, check=True, capture_output=True)
    try:
        exported = subprocess.run(["bash", str(S3_SH), "env"], env=env, check=True,
                                  capture_output=True, text=True).stdout
        for line in exported.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            os.environ[name] = value
        yield f"started by this script (tests/infra/s3.sh, port {OWN_PORTS['FLJOB_S3_PORT']})"
    finally:
        subprocess.run(["bash", str(S3_SH), "clean"], env=env, check=False, capture_output=True)


def swift_version() -> str:
    """The server's version, for the results file."""
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "swift-proxy"],
                            capture_output=True, text=True, check=False)
    return f"swift-proxy {result.stdout.strip() or 'unknown'} (Debian)"
