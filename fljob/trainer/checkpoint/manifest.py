"""``step-<N>/manifest.json``: enough to reproduce the run that wrote a checkpoint, and to
tell whether another spec may resume it (its compatibility record, :mod:`.compat`).

The resolved spec is the one the renderers ship (:func:`fljob.spec.loader.dump_spec`): it
holds credential *references* only, never values. Versions, the git commit and the image
say which code ran it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Mapping
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from fljob.spec.loader import dump_spec
from fljob.spec.models import JobSpec

_PACKAGES = ("fljob", "torch", "torchtitan", "mosaicml-streaming", "s3fs")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@cache
def git_sha() -> str | None:
    """The commit of the fljob checkout that runs, when it is one (else FLJOB_GIT_SHA, which
    an image build can bake in)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is not None and out.returncode == 0:
        return out.stdout.strip()
    return os.environ.get("FLJOB_GIT_SHA")


def build_manifest(spec: JobSpec, *, step: int, world_size: int, rank_tokens_seen: int,
                   compatibility: Mapping[str, Any],
                   run: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``rank_tokens_seen`` is the trainer's own counter: tokens this rank consumed (the
    metrics' ``tokens_seen`` sums it over the data-parallel ranks). ``compatibility`` is
    what a resume compares with its own spec (:mod:`.compat`); ``run`` what the run carries
    from process to process (its tracking id and goodput ledger,
    :mod:`fljob.trainer.metrics.goodput`)."""
    versions = {p: _version(p) for p in _PACKAGES}
    versions["python"] = platform.python_version()
    return {
        "step": step,
        "rank_tokens_seen": rank_tokens_seen,
        "world_size": world_size,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_id": os.environ.get("FLJOB_RUN_ID"),
        "image": spec.image,
        "git_sha": git_sha(),
        "versions": versions,
        "compatibility": dict(compatibility),
        "run": dict(run or {}),
        "spec": dump_spec(spec),
    }
