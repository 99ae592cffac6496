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

Registering a dataset is a race between processes of different jobs on one host: every rank
walks the prefixes to the lowest free one, then the local leader creates its ``_locals``
block. Two jobs starting in the same instant (packed sweep trials, SLURM jobs sharing a node)
pick the same prefix and one fails with ``FileExistsError: '/0000NN_locals'``; a prefix freed
between the leader's walk and another rank's makes the two disagree. :func:`registration_lock`
gives one job at a time the host to itself for that walk, and fljob frees prefixes only under
the same lock. (Streaming's own clean-up at exit does not take it; it frees nothing a walk
sees once the dataset has been iterated, since its file locks in the temp folder stay.)
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from multiprocessing import shared_memory
from pathlib import Path
from tempfile import gettempdir

import torch
from torch import distributed as dist

from fljob.files import held_lock, open_lock_file
from fljob.trainer.data.streaming_compat import import_streaming

SHM_DIR = Path("/dev/shm")
LOCALS_BLOCK = re.compile(r"^(\d{6})_locals$")
REGISTRATION_LOCK = "fljob-streaming-registration.lock"
"""In the temp folder, beside streaming's own file locks; every fljob job on the host uses it."""
RETRY_PAUSE_S = (0.01, 1.0)
"""First and longest random pause before the leaders of a multi-node job try again."""


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
    if _is_local_leader():
        with host_lock():  # never free a prefix while another job's ranks walk the prefixes
            release_leaked(cache_dirs)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def registration_lock() -> Iterator[None]:
    """Hold the host's registration lock while a streaming dataset is built.

    The local leader (``LOCAL_RANK`` 0) takes it; in a distributed job the other ranks wait
    for it before they walk the prefixes (each walks them itself, so what it sees must not
    change between the leader's walk and its own). It covers the whole constructor
    (streaming has no narrower hook), so the streams' small index files are fetched under it
    too.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        with host_lock() if _is_local_leader() else nullcontext():
            yield
        return
    fd = open_lock_file(_lock_path()) if _is_local_leader() else None
    try:
        _lock_on_every_host(fd)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def host_lock() -> AbstractContextManager[None]:
    """This process holds the host's registration lock: to register a dataset, to free a
    prefix. The death of the process drops it: a crashed job never leaves the host locked."""
    return held_lock(_lock_path())


def _lock_on_every_host(fd: int | None) -> None:
    """Every host's leader holds its lock, or none does.

    A leader that got its lock while another host's did not lets go, and all try again after
    a random pause: two multi-node jobs that share hosts then never hold one lock each while
    waiting for the other's. A collective, so every rank of the job calls it.
    """
    pause, longest = RETRY_PAUSE_S
    jitter = random.SystemRandom()  # not the seeded generator: two trials must not pause alike
    device = (torch.device("cuda", torch.cuda.current_device())
              if "gloo" not in str(dist.get_backend()) and torch.cuda.is_available()
              else torch.device("cpu"))
    while True:
        held = fd is None or _try_lock(fd)
        missing = torch.tensor([0 if held else 1], dtype=torch.int32, device=device)
        dist.all_reduce(missing, op=dist.ReduceOp.MAX)
        if not missing.item():
            return
        if fd is not None and held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        time.sleep(jitter.uniform(0, pause))
        pause = min(2 * pause, longest)


def _is_local_leader() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _lock_path() -> Path:
    return Path(gettempdir(), REGISTRATION_LOCK)  # read now: a test points the temp folder away


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
