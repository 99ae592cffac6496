"""One run at a time per checkpoint location: rank 0 holds ``<uri>/LOCK`` for the whole run.

Two runs on one checkpoint URI (or one run folder, where checkpoints go by default) would
overwrite each other's steps and ``latest``. The checkpointer takes the lock when it is built,
before anything is loaded or written, and gives it back when it closes; a second run is
refused (:class:`fljob.errors.UsageError`, exit 2) with a message that names the holder.

Local paths: an advisory ``fcntl.flock`` on the file ``<uri>/LOCK``. The kernel drops it when
the holder dies, however it dies, so a dead run never leaves it held. The file also holds the
owner (run id, host, pid, since) for the message, and is never deleted: deleting a lock file
lets two processes lock two different files. On NFS, Linux implements flock with NLM locks,
which other clients see; a client that crashed keeps its locks until the server's grace
period ends. A filesystem without locks gets a warning and no protection.

Object stores have no locks, so ``<uri>/LOCK`` is a *lease*: a JSON object with the owner
(``FLJOB_RUN_ID``, else one made up per process), host, pid and an expiry
:data:`LEASE_SECONDS` ahead, which a thread of rank 0 renews every fifth of that. Taking it:

* none there, or an expired one: taken (an expired lease of another run is taken over, with
  a warning naming it);
* one of the same owner (a requeued attempt or restarted pod of the same job, which keeps its
  ``FLJOB_RUN_ID``): taken back at once, whatever its expiry;
* another owner's lease whose holder is known to have ended (its record names a process of
  this machine, boot and pid namespace that no longer runs: a run killed or crashed on this
  node, then resubmitted here): taken over at once, with a warning;
* another owner's unexpired lease: refused, naming that run and when its lease expires.

Before every save, and again before every commit, rank 0 reads the lease back: a run whose
lease was taken from it (it stalled past the expiry and another run took over) stops with exit
1 before writing anything more.

Atomicity. With conditional writes (``If-None-Match: *`` to create, ``If-Match: <etag>`` to
take over or renew; AWS S3 and MinIO have them) two runs cannot both take the lease. Servers
without them (OpenStack Swift's S3 API answers 501 NotImplemented) get write, wait
:data:`SETTLE_SECONDS`, read back: of two runs starting together the last writer wins and the
other reads the winner's lease and is refused. Both can still win only when one run's read
and write are more than :data:`SETTLE_SECONDS` apart while the other's write lands between
them; the loser then finds out at its first renewal or save. Expiries are the writer's wall
clock: hosts must agree to well within :data:`LEASE_SECONDS` (NTP does).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

from torchtitan.tools.logging import logger

from fljob.errors import UsageError
from fljob.processes import ProcessId
from fljob.storage import split_s3
from fljob.trainer.checkpoint.store import LOCK, CheckpointError, CheckpointStore, describe_error

LEASE_SECONDS = 300.0
"""How long a lease outlives its last renewal: how long a run that died blocks another run
(not a requeued attempt of itself) from its checkpoint location."""
SETTLE_SECONDS = 1.0
"""Without conditional writes: how long a new lease must stay ours before it counts."""
RUN_ID_ENV = "FLJOB_RUN_ID"


@dataclass(frozen=True)
class Owner:
    """Who holds a lock: ``owner`` decides (a run id survives requeues), the rest informs."""

    owner: str
    run_id: str | None
    host: str
    pid: int
    ticks: int | None = None
    namespace: str | None = None

    @classmethod
    def this_process(cls) -> Owner:
        run_id = os.environ.get(RUN_ID_ENV) or None
        me = ProcessId.this_process()
        return cls(run_id or f"{socket.gethostname()}-{me.pid}-{uuid.uuid4().hex[:8]}", run_id,
                   socket.gethostname(), me.pid, me.ticks, me.namespace)


def holder_is_gone(record: dict[str, Any]) -> bool:
    """The lease's holder is known to have ended (killed, crashed: it could not release it):
    recorded on this machine, in this boot and pid namespace, and no longer running."""
    pid, ticks, namespace = record.get("pid"), record.get("ticks"), record.get("namespace")
    if not (isinstance(pid, int) and isinstance(ticks, int) and isinstance(namespace, str)):
        return False
    return ProcessId(pid, ticks, namespace).is_gone()


def describe_holder(record: dict[str, Any] | None) -> str:
    """"run 1234 (host h, pid 7)" from a lock's JSON, however incomplete."""
    record = record or {}
    who = f"run {record['run_id']}" if record.get("run_id") else "a run without FLJOB_RUN_ID"
    if record.get("host") or record.get("pid"):
        who += f" (host {record.get('host', '?')}, pid {record.get('pid', '?')})"
    return who if record else "an unknown run (its lock record is unreadable)"


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class CheckpointLock(ABC):
    """Rank 0's hold on a checkpoint location for the length of a run."""

    @abstractmethod
    def acquire(self) -> None:
        """Take the lock; :class:`UsageError` when another run holds it."""

    @abstractmethod
    def check(self) -> None:
        """:class:`CheckpointError` when this run no longer holds the lock."""

    @abstractmethod
    def release(self) -> None:
        """Give the lock back (safe to call twice, or without holding it)."""


def lock_for(store: CheckpointStore) -> CheckpointLock:
    if store.local:
        return FileLock(store.uri, Owner.this_process())
    return LeaseLock(store, Owner.this_process())


def _refusal(uri: str, holder: str, when: str) -> str:
    return (f"checkpoint location {uri} is in use by {holder}{when}: wait for that run to end, "
            "or give this run another checkpoint.uri (or another run_dir when checkpoint.uri is "
            "unset)")


class FileLock(CheckpointLock):
    """``fcntl.flock`` on ``<folder>/LOCK``, held through an open descriptor."""

    def __init__(self, folder: str, owner: Owner) -> None:
        self.folder, self.owner = folder, owner
        self.path = os.path.join(folder, LOCK)
        self.fd: int | None = None
        self.inode: int | None = None

    def acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self._read()
            since = f" since {holder['since']}" if holder and holder.get("since") else ""
            raise UsageError(_refusal(self.folder, describe_holder(holder), since)) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP...: a filesystem without locks
            os.close(fd)
            logger.warning(f"cannot lock {self.path} ({exc.strerror}): this filesystem has no "
                           f"locks, so a second run on {self.folder} would not be refused")
            return
        try:
            record = {**asdict(self.owner), "since": _utc(time.time())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.inode = fd, os.fstat(fd).st_ino

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as f:
                record = json.loads(f.read())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def check(self) -> None:
        if self.fd is None:
            return
        try:
            same = os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            same = False
        if not same:  # deleted or replaced: another run can lock the new file
            raise CheckpointError(f"{self.path} was removed while this run held it, so another "
                                  f"run may write {self.folder} now; stopping without saving")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None


class LeaseLock(CheckpointLock):
    """The ``<uri>/LOCK`` lease on S3 (see the module docstring)."""

    ATTEMPTS = 3

    def __init__(self, store: CheckpointStore, owner: Owner, seconds: float = LEASE_SECONDS,
                 settle: float = SETTLE_SECONDS) -> None:
        self.location, self.uri, self.owner = store.uri, f"{store.uri}/{LOCK}", owner
        self.bucket, prefix = split_s3(store.uri)
        self.key = f"{prefix}/{LOCK}" if prefix else LOCK
        self.secrets = store.secrets
        self.client = _s3_client(store.options)
        self.seconds, self.settle = seconds, settle
        self.instance = uuid.uuid4().hex  # this holder, even among attempts of one run
        self.conditional = True  # until the server says it has no conditional writes
        self.held = False
        self.lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ------------------------------------------------------------------ S3 round trips

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lease and its ETag; ({}, etag) when it is not readable JSON."""
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        try:
            record = json.loads(reply["Body"].read())
        except ValueError:
            record = {}
        return (record if isinstance(record, dict) else {}), reply["ETag"]

    def _write(self, etag: str | None, *, settle: bool) -> bool:
        """Put a fresh lease of ours, replacing the one with ``etag`` (None: there is none).
        False when another writer got there first."""
        from botocore.exceptions import ClientError, ParamValidationError

        now = time.time()
        body = json.dumps({**asdict(self.owner), "instance": self.instance,
                           "renewed": _utc(now), "expires": _utc(now + self.seconds),
                           "expires_unix": now + self.seconds}).encode()
        condition = ({"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}) if self.conditional else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                   ContentType="application/json", **condition)
        except (ClientError, ParamValidationError) as exc:
            reply = getattr(exc, "response", {})
            status = reply.get("ResponseMetadata", {}).get("HTTPStatusCode")
            unsupported = isinstance(exc, ParamValidationError) or status == 501 \
                or reply.get("Error", {}).get("Code") == "NotImplemented"  # the server, or an older botocore
            if condition and unsupported:
                logger.info(f"No conditional writes with this S3 server or client: the lease "
                            f"{self.uri} is written, then read back after {self.settle:g} s")
                self.conditional = False
                return self._write(etag, settle=settle)
            if status in (409, 412):  # ConditionalRequestConflict, PreconditionFailed
                return False
            raise
        if self.conditional or not settle:
            return True
        time.sleep(self.settle)
        record, _ = self._read()
        return record is not None and record.get("instance") == self.instance

    # ------------------------------------------------------------------ the lock

    def acquire(self) -> None:
        for _ in range(self.ATTEMPTS):
            record, etag = self._read()
            if record is not None and record.get("owner") != self.owner.owner:
                expires = record.get("expires_unix")
                if isinstance(expires, int | float) and expires > time.time() \
                        and not holder_is_gone(record):
                    raise UsageError(_refusal(self.location, describe_holder(record),
                                              f"; its lease expires at {record.get('expires')} "
                                              "unless that run renews it"))
            if self._write(etag, settle=True):
                self._announce(record)
                self.held = True
                self._renewer = threading.Thread(target=self._renew_loop, name="fljob-lease",
                                                 daemon=True)
                self._renewer.start()
                return
        raise UsageError(f"{self.uri} changed under this run {self.ATTEMPTS} times while it "
                         "tried to take it: another run is starting on the same checkpoint "
                         "location; give this run another checkpoint.uri")

    def _announce(self, previous: dict[str, Any] | None) -> None:
        if previous is None:
            logger.info(f"Took the lease {self.uri}")
        elif previous.get("owner") == self.owner.owner:
            logger.info(f"Took back this run's lease {self.uri} from {describe_holder(previous)}")
        elif holder_is_gone(previous):
            logger.warning(f"Took over the lease {self.uri} of {describe_holder(previous)}, which "
                           "ended on this machine without giving it back")
        else:
            logger.warning(f"Took over the lease {self.uri} of {describe_holder(previous)}, which "
                           f"expired at {previous.get('expires', '?')}")

    def check(self) -> None:
        """Read the lease back and renew it; :class:`CheckpointError` once it is not ours."""
        with self._mutex:
            if not self.held:
                return
            if self.lost is None:
                record, etag = self._read()
                if record is None or record.get("instance") != self.instance:
                    self.lost = f"the lease {self.uri} is no longer this run's ({self._whose(record)})"
                elif not self._write(etag, settle=False):
                    self.lost = f"the lease {self.uri} changed while this run renewed it"
            if self.lost is not None:
                raise CheckpointError(f"{self.lost}: another run may write this checkpoint "
                                      "location now; stopping without saving")

    def _whose(self, record: dict[str, Any] | None) -> str:
        if record is None:
            return "it was deleted"
        return f"{describe_holder(record)} holds it until {record.get('expires', '?')}"

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 5):
            try:
                self.check()
            except CheckpointError as exc:
                logger.error(str(exc))
                return
            except Exception as exc:  # noqa: BLE001  (the store may be down for a while)
                logger.warning(f"Could not renew the lease {self.uri} "
                               f"({describe_error(exc, self.secrets)}); trying again in "
                               f"{self.seconds / 5:g} s")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._mutex:
            if not self.held:
                return
            self.held = False
            if self.lost is not None:
                return
            try:
                record, _ = self._read()
                if record is not None and record.get("instance") == self.instance:
                    self.client.delete_object(Bucket=self.bucket, Key=self.key)
            except Exception as exc:  # noqa: BLE001  (it expires by itself)
                logger.warning(f"Could not release the lease {self.uri} "
                               f"({describe_error(exc, self.secrets)}); it expires by itself")


def _s3_client(options: dict[str, Any]) -> Any:
    """A boto3 client with the store's endpoint, region and credentials (those s3fs gets)."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
    given = {"endpoint_url": options.get("endpoint_url"),
             "region_name": options.get("client_kwargs", {}).get("region_name"),
             "aws_access_key_id": options.get("key"), "aws_secret_access_key": options.get("secret"),
             "aws_session_token": options.get("token")}
    return boto3.session.Session().client("s3", config=config,
                                          **{k: v for k, v in given.items() if v is not None})
