"""``/dev/shm`` hygiene for mosaicml-streaming.

Streaming coordinates the processes of a node through POSIX shared memory named
``/<prefix>_<what>`` and file locks in the temp folder, registered under a small integer
prefix together with the dataset's local cache folders. A run that crashes leaves them
behind, and its restart then fails with "Reused local directory" because the leaked block
still claims its cache folders.

Two ways to clean, chosen by whether the node's shared memory is this job's alone:

* exclusive (a Kubernetes pod has its own ``/dev/shm``; an exclusive SLURM allocation):
  streaming's own :func:`clean_stale_shared_memory`, which removes every leaked block;
* shared (the local backend, a shared SLURM node): only the blocks whose registered cache
  folders are this job's, so another job's live dataset is never touched.

Runs on local rank 0 while the node's other ranks wait at a barrier.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from multiprocessing import shared_memory
from pathlib import Path
from tempfile import gettempdir

from torch import distributed as dist

from fljob.trainer.data.streaming_compat import import_streaming

SHM_DIR = Path("/dev/shm")
LOCALS_BLOCK = re.compile(r"^(\d{6})_locals$")


def registered_locals() -> dict[int, list[str]]:
    """prefix -> the cache folders a streaming dataset on this node registered under it."""
    from streaming.base.shared.prefix import _unpack_locals

    found: dict[int, list[str]] = {}
    names = os.listdir(SHM_DIR) if SHM_DIR.is_dir() else []
    for name in names:
        match = LOCALS_BLOCK.match(name)
        if not match:
            continue
        try:
            block = shared_memory.SharedMemory(name=name, create=False)
        except (FileNotFoundError, PermissionError):
            continue
        try:
            found[int(match.group(1))] = _unpack_locals(bytes(block.buf))[0]
        except (ValueError, UnicodeDecodeError):
            pass
        finally:
            block.close()
    return found


def release_prefix(prefix: int) -> None:
    """Unlink every shared-memory block and file lock of one streaming prefix."""
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path

    for what in SHM_TO_CLEAN:
        try:
            block = shared_memory.SharedMemory(name=_get_path(prefix, what), create=False)
        except (FileNotFoundError, PermissionError):
            continue
        block.close()
        block.unlink()
    for lock in (BARRIER_FILELOCK, CACHE_FILELOCK):
        Path(gettempdir(), _get_path(prefix, lock)).unlink(missing_ok=True)


def release_leaked(cache_dirs: Iterable[str]) -> list[int]:
    """Release the prefixes that claim any of ``cache_dirs``; return them."""
    ours = {os.path.abspath(d) for d in cache_dirs}
    leaked = [prefix for prefix, dirs in registered_locals().items()
              if ours & {os.path.abspath(d) for d in dirs}]
    for prefix in leaked:
        release_prefix(prefix)
    return leaked


def clean_shared_memory(cache_dirs: Iterable[str], exclusive: bool) -> None:
    """Before building the dataset: drop what crashed runs left (see the module docstring)."""
    import_streaming()
    if exclusive:
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()  # local rank 0 cleans, then it barriers itself
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        release_leaked(cache_dirs)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
