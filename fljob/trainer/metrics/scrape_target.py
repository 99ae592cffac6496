"""SLURM scraping: the job's Prometheus ``file_sd`` target, written at start, removed at exit.

Prometheus cannot discover processes on SLURM nodes, so rank 0 announces itself: one JSON
file per run in a folder Prometheus watches through ``file_sd_configs`` (see
``configs/prometheus/prometheus.yml``)::

    [{"targets": ["node017:19464"], "labels": {"job": "...", "run_id": "...", "slurm_job_id": "..."}}]

The file is written to a temporary name and renamed, so Prometheus never reads half of it,
and removed when the exporter closes (normal end, preemption, exceptions, interpreter
exit). A job killed with SIGKILL leaves its file behind: its target then shows as down and
the ``FljobTargetDown`` alert names it; a SLURM epilog can remove ``<job>-<run_id>.json``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from pathlib import Path

HOST_ENV = "FLJOB_METRICS_HOST"
"""Overrides the host name written into the target (default: this node's host name)."""


def advertised_host() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def target_file(folder: str | Path, job: str, run_id: str) -> Path:
    """``<folder>/<job>-<run_id>.json``, with anything but ``[A-Za-z0-9_.-]`` replaced."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{job}-{run_id}")
    return Path(folder) / f"{safe}.json"


def write_target(path: Path, host: str, port: int, labels: dict[str, str]) -> None:
    """Atomically (write, then rename within the folder) publish one scrape target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps([{"targets": [f"{host}:{port}"], "labels": labels}], indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.chmod(tmp, 0o644)  # Prometheus usually runs as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_target(path: Path) -> None:
    path.unlink(missing_ok=True)
