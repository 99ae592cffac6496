"""Writing fljob's output files: all of them or none, and a clear line when the disk says no.

Every command that writes files (render, submit, dashboard, coord-check, sweep report) goes
through :func:`write_files`: each file is written to a temporary name beside its target and
renamed only once every file is written, so a read-only folder, a path that is a file, a full
disk or a missing permission leaves nothing half-written; the error names the path and the
cause in words, and the CLI exits 2.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fljob.errors import UsageError, elide

CAUSES = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EEXIST: "a file is in the way of a folder",
    errno.ENAMETOOLONG: "the name is too long",
}


def cause(exc: OSError) -> str:
    """What went wrong, in words (the errno's, or the system's own)."""
    return CAUSES.get(exc.errno or 0, exc.strerror or str(exc))


class WriteError(UsageError):
    """A file could not be written; nothing of the batch was left behind."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"cannot write {elide(path)}: {cause(exc)}. Choose another output folder, or free or "
                         "fix that one; nothing was written")
        self.path = path


@dataclass(frozen=True)
class OutFile:
    name: str  # relative to the folder; may hold subfolders
    content: str | bytes
    mode: int = 0o644


def write_files(folder: Path, files: Iterable[OutFile]) -> list[Path]:
    """Write every file under ``folder`` or none (temp file + rename, after all are written)."""
    staged: list[tuple[Path, Path]] = []
    made: list[Path] = []
    target = folder
    try:
        for f in files:
            target = folder / f.name
            for parent in reversed([p for p in [target.parent, *target.parent.parents] if not p.exists()]):
                parent.mkdir()
                made.append(parent)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            staged.append((tmp, target))
            if isinstance(f.content, bytes):
                tmp.write_bytes(f.content)
            else:
                tmp.write_text(f.content, encoding="utf-8")
            tmp.chmod(f.mode)
        for tmp, target in staged:
            tmp.replace(target)
    except OSError as exc:
        for leftover in [*(tmp for tmp, _ in staged), *reversed(made)]:
            try:
                leftover.rmdir() if leftover.is_dir() else leftover.unlink(missing_ok=True)
            except OSError:
                pass
        raise WriteError(target, exc) from None
    return [t for _, t in staged]


def check_writable(folder: Path) -> None:
    """Raise :class:`WriteError` now when ``folder`` could not be created or written to later,
    so that a command that computes for minutes before it writes is refused before it starts.

    The nearest existing folder of the path gets an empty probe file, removed at once: only a
    real write tells a read-only file system or a missing permission apart (root ignores
    permission bits). Nothing is created on the way.
    """
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p == p.parent)
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        fd, probe = tempfile.mkstemp(prefix=".fljob-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WriteError(folder, exc) from None


def open_lock_file(path: Path) -> int:
    """A descriptor to ``flock`` ``path`` through, the file created if it is missing.

    ``flock`` needs only read access, so the file is opened read-only and made readable by
    all: one lock file serves the processes of every user (a host-wide lock in the temp folder).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        os.fchmod(fd, 0o644)  # past a strict umask, for the next user's processes
    except PermissionError:
        pass  # another user's file, and readable, or open would have failed
    return fd


@contextmanager
def held_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` while the block runs (waiting for it first).

    Closing the file drops it, and so does the death of the process: a crash never leaves
    it held.
    """
    fd = open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
