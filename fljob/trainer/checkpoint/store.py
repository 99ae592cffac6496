"""Where checkpoints live, and the commit protocol on top of plain object storage.

Layout under the checkpoint URI (an ``s3://`` prefix, a ``file://`` URI or a path)::

    step-<N>/                DCP's shards (``__<rank>_<i>.distcp``) and its ``.metadata``
    step-<N>/manifest.json   what produced the step (spec, versions, git SHA, image, world size)
    step-<N>/COMMITTED       JSON written last, by rank 0, once every rank's shards landed;
                             it records the size of every file of the step
    latest                   the name of the newest committed step ("step-<N>")
    LOCK                     who writes here now (:mod:`.lock`)

Object stores have no rename and no transaction; what they do have is atomic object creation
(a single PUT either exists whole or not at all). So a step counts only once its small commit
marker exists, ``latest`` is rewritten with one PUT (locally: write-then-rename) after the
marker, and readers trust ``latest`` only after checking the marker it names, falling back to
the newest committed step when it is missing or broken. Retention counts committed steps only,
so failed saves can never push the last good checkpoint out of the window.

A committed step is still checked before it is loaded (:meth:`CheckpointStore.damage`): a file
the marker lists that is now missing or of another size (a truncated copy, a lost object)
names the step as damaged instead of failing somewhere inside DCP.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from torchtitan.tools.logging import logger

from fljob.errors import JobFailed
from fljob.exitcodes import FAILED
from fljob.spec.models import Storage
from fljob.storage import storage_environment

STEP_PREFIX = "step-"
COMMIT_MARKER = "COMMITTED"
MANIFEST = "manifest.json"
LATEST = "latest"
LOCK = "LOCK"
DCP_METADATA = ".metadata"
_STEP_NAME = re.compile(rf"^{STEP_PREFIX}(\d+)$")


class CheckpointError(JobFailed):
    """A checkpoint could not be saved, committed or loaded; the message is one line that
    names the URI and the cause (never a credential)."""

    def __init__(self, message: str) -> None:
        super().__init__(FAILED, message)


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def normalize_uri(uri: str, base_dir: str) -> str:
    """``s3://`` as is; ``file://`` and plain paths as an absolute path (relative to the run)."""
    if uri.startswith("s3://"):
        return uri.rstrip("/")
    path = urlparse(uri).path if uri.startswith("file://") else uri
    return os.path.abspath(os.path.join(base_dir, path))


def storage_options(uri: str, storage: Storage, environ: Mapping[str, str]) -> dict[str, Any]:
    """fsspec options for ``uri``: for S3, the endpoint, region and credentials that the spec's
    storage section references (resolved now, passed to s3fs explicitly, never logged)."""
    if not uri.startswith("s3://"):
        return {}
    env = storage_environment(storage, environ)
    options: dict[str, Any] = {"client_kwargs": {"region_name": storage.region}}
    if storage.endpoint_url:
        options["endpoint_url"] = storage.endpoint_url
    for option, variable in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"),
                             ("token", "AWS_SESSION_TOKEN")):
        if variable in env:
            options[option] = env[variable]
    return options


def describe_error(exc: BaseException, secrets: list[str]) -> str:
    """One line for ``exc``: the innermost useful cause, with any secret value masked.

    DCP wraps the failures of every rank in a ``CheckpointException`` whose text is a
    traceback per rank; the first rank's own exception is what a person needs to read.
    """
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = min(failures.items(), key=lambda item: item[0])
        inner = wrapped[0] if isinstance(wrapped, tuple) else getattr(wrapped, "exc", wrapped)
        if isinstance(inner, BaseException):
            return f"rank {rank}: {describe_error(inner, secrets)}"
    text = " ".join(str(exc).split()) or repr(exc)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"


class CheckpointStore:
    """The checkpoint URI as an fsspec filesystem, with the naming and commit rules above."""

    def __init__(self, uri: str, options: Mapping[str, Any] | None = None) -> None:
        self.uri = uri
        self.options = dict(options or {})
        self.fs: AbstractFileSystem
        self.fs, self.root = url_to_fs(uri, **self.options)
        self.local = isinstance(self.fs, LocalFileSystem)

    @property
    def secrets(self) -> list[str]:
        """Values to mask in any message about this store."""
        return [str(self.options[k]) for k in ("key", "secret", "token") if self.options.get(k)]

    def step_uri(self, step: int) -> str:
        """The DCP checkpoint id of ``step`` (a URI for remote stores, a path locally)."""
        return f"{self.uri}/{step_name(step)}"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # ------------------------------------------------------------------ small objects

    def write_object(self, name: str, data: bytes) -> None:
        """Create or replace one small object whole: a single PUT on S3, a rename locally."""
        path = self._path(name)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):  # a full disk must not keep the half file
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(path, data)

    def read_object(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ steps

    def refresh(self) -> None:
        """Forget cached listings: other ranks and other runs write here too."""
        self.fs.invalidate_cache()

    def steps(self) -> list[int]:
        """Every ``step-<N>`` folder (prefix) present, committed or not, ascending."""
        self.refresh()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        found = (_STEP_NAME.match(os.path.basename(e["name"].rstrip("/")))
                 for e in entries if e.get("type") == "directory")
        return sorted(int(m.group(1)) for m in found if m)

    def files(self, step: int) -> dict[str, int]:
        """Name -> size of the objects of ``step`` (none when ``step-<N>`` is not a folder)."""
        self.refresh()
        folder = self._path(step_name(step))
        try:
            listing = self.fs.ls(folder, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {os.path.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in listing if e.get("type") != "directory" and e["name"].rstrip("/") != folder}

    def commit_record(self, step: int) -> dict[str, Any] | None:
        """The parsed commit marker of ``step``, or None when it is absent or unreadable."""
        raw = self.read_object(f"{step_name(step)}/{COMMIT_MARKER}")
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) and record.get("step") == step else None

    def is_committed(self, step: int) -> bool:
        return self.commit_record(step) is not None

    def committed_steps(self) -> list[int]:
        return [s for s in self.steps() if self.is_committed(s)]

    def commit(self, step: int, record: Mapping[str, Any]) -> dict[str, Any]:
        """Mark ``step`` complete, then point ``latest`` at it; returns the marker's content.
        DCP's ``.metadata`` (written after every rank's shards were gathered) must be there."""
        files = self.files(step)
        if DCP_METADATA not in files:
            raise FileNotFoundError(f"{self.step_uri(step)}/{DCP_METADATA} is missing: the DCP save "
                                    "did not finish")
        files.pop(COMMIT_MARKER, None)
        shards = {n: s for n, s in files.items() if n.endswith(".distcp")}
        body = {"step": step, **record, "files": len(shards), "bytes": sum(shards.values()),
                "sizes": files}
        self.write_object(f"{step_name(step)}/{COMMIT_MARKER}",
                          json.dumps(body, indent=1, sort_keys=True).encode())
        self.point_latest(step)
        return body

    def point_latest(self, step: int) -> None:
        self.write_object(LATEST, (step_name(step) + "\n").encode())

    def uncommit(self, step: int) -> None:
        """Make ``step`` count as uncommitted (its files stay, like a failed save's)."""
        self.fs.rm_file(self._path(step_name(step), COMMIT_MARKER))

    def size(self, name: str) -> int | None:
        """The size of one object, asked for directly: a listing may lag behind writes."""
        path = self._path(name)
        self.fs.invalidate_cache(path)
        try:
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def damage(self, step: int, record: Mapping[str, Any]) -> str | None:
        """What is wrong with the files of committed ``step`` (its marker is ``record``); None
        when every file the marker lists has its recorded size. Markers written before
        per-file sizes record the shards' count and total bytes only."""
        listing = self.files(step)
        sizes = record.get("sizes")
        if not isinstance(sizes, Mapping):
            shards = [size for name, size in listing.items() if name.endswith(".distcp")]
            if DCP_METADATA not in listing:
                return f"{DCP_METADATA} is missing"
            if (len(shards), sum(shards)) != (record.get("files"), record.get("bytes")):
                return (f"its shards are {len(shards)} files of {sum(shards)} bytes, the commit "
                        f"recorded {record.get('files')} files of {record.get('bytes')} bytes")
            return None
        wrong = []
        for name, expected in sorted(sizes.items()):
            if listing.get(name) == expected:
                continue
            actual = self.size(f"{step_name(step)}/{name}")
            if actual is None:
                wrong.append(f"{name} is missing")
            elif actual != expected:
                wrong.append(f"{name} is {actual} bytes, the commit recorded {expected}")
        if not wrong:
            return None
        return wrong[0] + (f" (and {len(wrong) - 1} more files differ)" if len(wrong) > 1 else "")

    def latest_step(self) -> int | None:
        """The step to resume from: ``latest`` when it names a committed step, else the newest
        committed step (with a warning saying why), else None."""
        raw = self.read_object(LATEST)
        named = _STEP_NAME.match(raw.decode(errors="replace").strip()) if raw is not None else None
        if named and self.is_committed(int(named.group(1))):
            return int(named.group(1))
        committed = self.committed_steps()
        if raw is not None or committed:
            why = ("is missing" if raw is None else
                   f"names {raw[:40].decode(errors='replace').strip()!r}, which is not a committed step")
            choice = step_name(committed[-1]) if committed else "nothing: starting from scratch"
            logger.warning(f"{self.uri}/{LATEST} {why}; resuming from {choice}")
        return committed[-1] if committed else None

    def remove_step(self, step: int) -> None:
        """Delete a step, its commit marker first: a half-deleted step never looks committed.
        One object per request (see :mod:`.dcp_storage` on bulk deletes and S3-compatible
        stores); a step is a handful of objects."""
        names = sorted(self.files(step), key=lambda name: name != COMMIT_MARKER)
        for name in names:
            self.fs.rm_file(self._path(step_name(step), name))
        if self.local:
            os.rmdir(self._path(step_name(step)))

    def apply_retention(self, keep: int) -> list[int]:
        """Keep the newest ``keep`` committed steps; delete older committed steps and any
        uncommitted step older than the newest commit (a save that failed or was cut off).
        Uncommitted steps newer than the newest commit may still be in flight: left alone."""
        steps = self.steps()
        committed = [s for s in steps if self.is_committed(s)]
        if not committed:
            return []
        newest = committed[-1]
        doomed = committed[:-keep] + [s for s in steps if s < newest and s not in committed]
        for step in sorted(doomed):
            self.remove_step(step)
        return sorted(doomed)
