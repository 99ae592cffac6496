"""One run at a time per checkpoint location (fljob.trainer.checkpoint.lock), on the real S3
server (OpenStack Swift, tests/infra/s3.sh) and on a local folder.

* The lease itself, against Swift (a second each): taken, renewed, released; another run's
  unexpired lease refused naming it and its expiry; an expired one taken over and logged; a
  requeued attempt of the same job (same FLJOB_RUN_ID) takes its lease back and the old
  holder finds out; two runs starting at the same instant: exactly one wins. Swift's S3 API
  has no conditional writes (it answers 501), so these run the write-then-read-back path.
* Real `fljob train` runs: a second run on the location of a running one exits 2 with one
  line naming the first (locally: the flock; on S3: the lease and its expiry) and changes
  nothing; once the first has ended, the location is free again.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchtitan", reason="torchtitan (the trainer extra) is not installed")

from test_checkpoint import Run, Where, last_line, train, write_spec
from test_checkpoint import where as where  # noqa: PLC0414  (the fixture, by its name)

from fljob.errors import UsageError
from fljob.exitcodes import REQUEUE, USAGE
from fljob.processes import ProcessId, start_ticks
from fljob.trainer.checkpoint.lock import LeaseLock, Owner
from fljob.trainer.checkpoint.store import CheckpointError, CheckpointStore

LEASE_S = 30.0  # long enough for a test, short enough to expire one on purpose


@pytest.fixture
def store(s3_server) -> CheckpointStore:
    uri = f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}/ckpt"
    return CheckpointStore(uri, {"endpoint_url": s3_server.endpoint_url, "key": s3_server.access_key_id,
                                 "secret": s3_server.secret_access_key,
                                 "client_kwargs": {"region_name": s3_server.region}})


def lease(store: CheckpointStore, run_id: str, **kwargs: Any) -> LeaseLock:
    return LeaseLock(store, Owner(run_id, run_id, "node-a", 4242), seconds=LEASE_S, settle=0.3, **kwargs)


def lease_record(store: CheckpointStore) -> dict[str, Any] | None:
    """The lease object, read outside fljob's lock code."""
    raw = store.read_object("LOCK")
    return json.loads(raw) if raw is not None else None


def test_a_lease_is_taken_renewed_and_released(store: CheckpointStore) -> None:
    mine = lease(store, "run-a")
    mine.acquire()
    try:
        first = lease_record(store)
        assert first["owner"] == "run-a" and first["host"] == "node-a" and first["pid"] == 4242
        assert time.time() < first["expires_unix"] <= time.time() + LEASE_S
        time.sleep(1.1)
        mine.check()  # reads it back and renews it
        assert lease_record(store)["expires_unix"] > first["expires_unix"]
    finally:
        mine.release()
    assert lease_record(store) is None


def test_another_runs_unexpired_lease_is_refused_naming_it(store: CheckpointStore) -> None:
    first = lease(store, "run-a")
    first.acquire()
    try:
        expires = lease_record(store)["expires"]
        with pytest.raises(UsageError) as refused:
            lease(store, "run-b").acquire()
        assert str(refused.value) == (
            f"checkpoint location {store.uri} is in use by run run-a (host node-a, pid 4242); its "
            f"lease expires at {expires} unless that run renews it: wait for that run to end, or "
            "give this run another checkpoint.uri (or another run_dir when checkpoint.uri is unset)")
        first.check()  # the refused run left the lease alone
        assert lease_record(store)["owner"] == "run-a"
    finally:
        first.release()


def test_an_expired_lease_is_taken_over_and_logged(store: CheckpointStore,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    dead = {"owner": "run-dead", "run_id": "run-dead", "host": "node-a", "pid": 4242,
            "expires": "2020-01-01T00:00:00Z", "expires_unix": 1577836800.0}  # nobody renews it
    store.write_object("LOCK", json.dumps(dead).encode())
    new = lease(store, "run-new")
    new.acquire()
    try:
        assert ("Took over the lease " f"{store.uri}/LOCK of run run-dead (host node-a, pid 4242), "
                "which expired at 2020-01-01T00:00:00Z") in caplog.text
        assert lease_record(store)["owner"] == "run-new"
    finally:
        new.release()


def test_the_unexpired_lease_of_a_run_that_died_on_this_machine_is_taken_over(
        store: CheckpointStore, caplog: pytest.LogCaptureFixture) -> None:
    """A run killed without warning (SIGKILL, OOM) cannot give its lease back; resubmitted on the
    same machine, the next run sees that the holder's process is gone and does not wait out the
    expiry. A live holder on this machine, or one recorded elsewhere, is still refused."""
    here = ProcessId.this_process()
    dead_child = subprocess.Popen(["sleep", "30"])
    dead = ProcessId(dead_child.pid, start_ticks(dead_child.pid), here.namespace)
    dead_child.kill()
    dead_child.wait()
    for holder, refused in ((here, True), (dead, False),
                            (ProcessId(dead.pid, dead.ticks, "another-boot/pid:[1]"), True)):
        store.write_object("LOCK", json.dumps({
            "owner": "run-killed", "run_id": "run-killed", "host": "node-a", "pid": holder.pid,
            "ticks": holder.ticks, "namespace": holder.namespace, "expires": "2099-01-01T00:00:00Z",
            "expires_unix": 4070908800.0}).encode())
        new = lease(store, "run-next")
        if refused:
            with pytest.raises(UsageError, match="is in use by run run-killed"):
                new.acquire()
            continue
        new.acquire()
        try:
            assert (f"Took over the lease {store.uri}/LOCK of run run-killed (host node-a, pid "
                    f"{dead.pid}), which ended on this machine without giving it back") in caplog.text
            assert lease_record(store)["owner"] == "run-next"
        finally:
            new.release()


def test_a_requeued_attempt_takes_its_lease_back_and_the_old_one_finds_out(
        store: CheckpointStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    before = lease(store, "job-17")
    before.acquire()  # then "killed": its lease is unexpired
    after = lease(store, "job-17")
    after.acquire()
    try:
        assert f"Took back this run's lease {store.uri}/LOCK from run job-17" in caplog.text
        with pytest.raises(CheckpointError, match=rf"the lease {store.uri}/LOCK is no longer this "
                                                  r"run's \(run job-17 \(host node-a, pid 4242\) holds it "
                                                  r"until \S+Z\): another run may write"):
            before.check()
        before.release()  # lost: it must not delete the new holder's lease
        after.check()
    finally:
        after.release()


def race(contenders: list[LeaseLock]) -> dict[int, str]:
    """Every contender tries to acquire at the same instant: "won", or its refusal."""
    start = threading.Barrier(len(contenders))
    outcome: dict[int, str] = {}

    def take(n: int) -> None:
        start.wait()
        try:
            contenders[n].acquire()
            outcome[n] = "won"
        except UsageError as exc:
            outcome[n] = str(exc)

    threads = [threading.Thread(target=take, args=(n,)) for n in range(len(contenders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome


def test_of_two_runs_starting_together_exactly_one_wins(store: CheckpointStore) -> None:
    """Both read "no lease" and both write it: reading it back after the settle time, the one
    whose write landed first sees the other's and is refused."""
    for attempt in range(3):
        contenders = [lease(store, f"run-{attempt}-{n}") for n in range(2)]
        outcome = race(contenders)
        winners = [n for n, result in outcome.items() if result == "won"]
        assert len(winners) == 1, outcome
        assert f"in use by run run-{attempt}-{winners[0]} " in outcome[1 - winners[0]]
        assert lease_record(store)["owner"] == f"run-{attempt}-{winners[0]}"
        for contender in contenders:
            contender.release()
        assert lease_record(store) is None


# --------------------------------------------------------------------------- real runs


def test_a_second_run_on_a_running_runs_location_is_refused(tmp_path: Path, where: Where) -> None:
    spec = write_spec(tmp_path, where, "held", steps=100_000, interval=1_000)
    first = Run(spec, where)
    try:
        first.wait_for(r"Training starts at step 1\n")
        second = train(spec, where, "training.steps=5", expect=USAGE, run_id="job-second")
    finally:
        first.proc.send_signal(signal.SIGUSR2)
    assert first.wait() == REQUEUE, first.output[-3000:]
    line = last_line(second)
    holder = rf"run {where.run_id} \(host \S+, pid {first.proc.pid}\)"
    if where.server is None:
        assert re.fullmatch(rf"fljob train: checkpoint location {where.uri} is in use by {holder} "
                            r"since \S+Z: wait for that run to end, or give this run another "
                            r"checkpoint.uri \(or another run_dir when checkpoint.uri is unset\)", line), line
    else:
        assert re.fullmatch(rf"fljob train: checkpoint location {where.uri} is in use by {holder}; "
                            r"its lease expires at \S+Z unless that run renews it: wait for that run "
                            r"to end, .*", line), line
        assert where.read("LOCK") is None  # released by the first run as it ended
    stop = int(re.search(r"stopping after step (\d+)", first.output).group(1))
    assert where.latest() == f"step-{stop}"  # the refused run wrote nothing

    again = train(spec, where, f"training.steps={stop + 1}", run_id="job-second")
    assert re.search(rf"Loading \S+/step-{stop}\b", again)
