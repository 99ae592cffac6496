"""Checkpoints of real `fljob train` runs, on a local folder and on the real S3 server
(OpenStack Swift, tests/infra/s3.sh): exact resume after a preemption, and faults.

* Exact resume: a run of 2N steps and a run stopped by SIGUSR2 after about N steps (exit 75,
  checkpoint committed) then resumed to 2N log bitwise the same loss and gradient norm at
  every step: model, optimizer, schedule, dataloader position and step counters all resume.
* Faults, each produced by the real server, stopped by PID between saves (the trainer is
  frozen with SIGSTOP meanwhile so the timing is deterministic): the proxy down (connection
  refused) and the object server down (the proxy answers 503) -> that step is not committed,
  `latest` still names the previous one, one error line names the URI and the cause, training
  goes on and the next save commits; a pre-requeue save that fails exits 1, not 75, and a
  restart resumes from the last committed step; a trainer killed during an upload leaves an
  uncommitted step that a restart never loads.
* The S3 credentials reach the trainer only through the spec's storage references (no AWS_*
  variables in its environment), and their secret value appears in no output, no file of the
  run folder and no manifest.
* Trust on resume: a spec that changed what the checkpoint depends on (the optimizer) is
  refused with exit 2 and one line, one with more steps resumes and says what changed; a
  committed step with a truncated shard is named, loses its marker, and resume falls back to
  the previous commit. The lock that keeps two runs apart: test_checkpoint_lock.py.

Each run is a tiny-model CPU subprocess of ~8 s (start-up dominates); the module runs about
a dozen of them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from ports import free_port

pytest.importorskip("torchtitan", reason="torchtitan (the trainer extra) is not installed")

from fljob.exitcodes import FAILED, OK, REQUEUE, USAGE

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300
KEY_ENV, SECRET_ENV = "FLJOB_TEST_S3_KEY_ID", "FLJOB_TEST_S3_SECRET"
# Variables through which credentials or an endpoint could reach the trainer other than the spec.
AMBIENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
           "S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")

pytestmark = pytest.mark.slow


class Where:
    """A checkpoint location (a folder, or a fresh prefix on the S3 server) and the spec and
    environment that reach it. Its runs are attempts of one job: they share a FLJOB_RUN_ID, as
    a requeued SLURM job or a restarted pod does (so a restart takes the lease back)."""

    def __init__(self, tmp_path: Path, server=None) -> None:
        self.server = server
        self.run_id = f"job-{uuid.uuid4().hex[:8]}"
        if server is None:
            self.uri = str(tmp_path / "checkpoints")
        else:
            self.uri = f"s3://{server.bucket}/{uuid.uuid4().hex[:12]}/ckpt"

    def storage(self) -> dict[str, Any]:
        if self.server is None:
            return {}
        return {"storage": {"endpoint_url": self.server.endpoint_url, "region": self.server.region,
                            "access_key_id": {"env": KEY_ENV},
                            "secret_access_key": {"env": SECRET_ENV}}}

    def env(self, run_id: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in AMBIENT}
        env.update(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(REPO),
                   PYTHONUNBUFFERED="1",  # the test reads the output while the run goes on
                   FLJOB_RUN_ID=run_id or self.run_id)
        if self.server is not None:
            env[KEY_ENV], env[SECRET_ENV] = self.server.access_key_id, self.server.secret_access_key
        return env

    @property
    def secret(self) -> str | None:
        return self.server.secret_access_key if self.server else None

    def read(self, name: str) -> bytes | None:
        """An object or file under the checkpoint URI, read outside fljob's code."""
        if self.server is None:
            path = Path(self.uri) / name
            return path.read_bytes() if path.exists() else None
        prefix = self.uri.removeprefix(f"s3://{self.server.bucket}/")
        try:
            return self.server.client().get_object(Bucket=self.server.bucket,
                                                   Key=f"{prefix}/{name}")["Body"].read()
        except self.server.client().exceptions.NoSuchKey:
            return None

    def step_names(self) -> list[str]:
        if self.server is None:
            return sorted(p.name for p in Path(self.uri).glob("step-*"))
        prefix = self.uri.removeprefix(f"s3://{self.server.bucket}/") + "/"
        pages = self.server.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.server.bucket, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return sorted({k[len(prefix):].split("/")[0] for k in keys if "/" in k[len(prefix):]})

    def write(self, name: str, data: bytes) -> None:
        """Replace an object or file under the checkpoint URI, outside fljob's code."""
        if self.server is None:
            (Path(self.uri) / name).write_bytes(data)
            return
        prefix = self.uri.removeprefix(f"s3://{self.server.bucket}/")
        self.server.client().put_object(Bucket=self.server.bucket, Key=f"{prefix}/{name}", Body=data)

    def latest(self) -> str | None:
        raw = self.read("latest")
        return raw.decode().strip() if raw is not None else None

    def committed(self, step: int) -> bool:
        return self.read(f"step-{step}/COMMITTED") is not None


def write_spec(tmp_path: Path, where: Where, name: str, *, steps: int, interval: int,
               keep: int = 2, procs: int = 1) -> Path:
    run_dir = tmp_path / name
    spec = {
        "name": name,
        "run_dir": str(run_dir),
        "resources": {"procs_per_node": procs},
        "model": {"flavor": "tiny", "mup": True},
        "optimizer": {"name": "adopt", "lr": 3e-3},
        "schedule": {"warmup_steps": 3},
        "training": {"steps": steps, "local_batch_size": 4, "seq_len": 32, "device": "cpu"},
        "checkpoint": {"uri": where.uri, "interval_steps": interval, "keep_latest": keep},
        "metrics": {"port": free_port()},
        **where.storage(),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


class Run:
    """One `fljob train` subprocess (under `fljob launch` for several ranks, which forwards
    signals to them), its output in a file (a full pipe would stall it)."""

    def __init__(self, spec: Path, where: Where, *overrides: str, procs: int = 1,
                 run_id: str | None = None) -> None:
        self.spec, self.where = spec, where
        self.log = spec.with_suffix(f".{time.monotonic_ns()}.log")
        sets = [a for o in overrides for a in ("--set", o)]
        launch = ["launch", "--standalone", "--nnodes=1", f"--nproc-per-node={procs}", "--"]
        self._out = open(self.log, "w")  # noqa: SIM115  (closed in wait())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fljob.cli", *(launch if procs > 1 else []), "train", str(spec),
             *sets], cwd=spec.parent,
            env=where.env(run_id), stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output)
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended ({self.proc.returncode}) before "
                                     f"{pattern!r}:\n{self.output[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {RUN_TIMEOUT_S} s")

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The trainer stopped (SIGSTOP) for the duration: server changes land between steps."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def wait(self) -> int:
        try:
            self.proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if self.proc.poll() is None:  # only on failure: stop the run we started
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self._out.close()
        return self.proc.returncode

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait()


def train(spec: Path, where: Where, *overrides: str, expect: int = OK, procs: int = 1,
          run_id: str | None = None) -> str:
    run = Run(spec, where, *overrides, procs=procs, run_id=run_id)
    code = run.wait()
    assert code == expect, f"exit {code}, expected {expect}:\n{run.output[-3000:]}"
    return run.output


def last_line(output: str) -> str:
    """The CLI's one error line; the only line of the output that it prints."""
    lines = output.strip().splitlines()
    assert "Traceback" not in output, output[-3000:]
    assert sum(line.startswith("fljob train:") for line in lines) == 1, output[-3000:]
    return lines[-1]


def records(spec: Path) -> list[dict[str, Any]]:
    path = spec.parent / spec.stem / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_no_secret(where: Where, spec: Path, *outputs: str) -> None:
    """The secret value is nowhere: outputs, any file of the run folder, the manifests."""
    if where.secret is None:
        return
    needle = where.secret.encode()
    for text in outputs:
        assert where.secret not in text
    for path in (spec.parent / spec.stem).rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), f"the S3 secret is in {path}"
    for name in where.step_names():
        manifest = where.read(f"{name}/manifest.json")
        if manifest is not None:
            assert needle not in manifest, f"the S3 secret is in {name}/manifest.json"


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    server = request.getfixturevalue("s3_server") if request.param == "s3" else None
    return Where(tmp_path, server)


@pytest.fixture
def on_s3(s3_server, tmp_path: Path) -> Where:
    return Where(tmp_path, s3_server)


# --------------------------------------------------------------------------- exact resume

TOTAL = 30  # 2N
SIGNAL_AFTER = 12  # N: the signal is sent once this many steps are logged


def test_preempted_and_resumed_run_matches_an_uninterrupted_one_bitwise(tmp_path: Path,
                                                                        where: Where) -> None:
    check_exact_resume(tmp_path, where, procs=1)


def test_two_ranks_preempted_and_resumed_match_bitwise(tmp_path: Path, on_s3: Where) -> None:
    """FSDP over 2 ranks: each rank writes its own shards; rank 0 commits after DCP has
    gathered both, and tells rank 1 (every rank must agree on what is committed)."""
    check_exact_resume(tmp_path, on_s3, procs=2)


def check_exact_resume(tmp_path: Path, where: Where, procs: int) -> None:
    elsewhere = Where(tmp_path / "straight", where.server)
    straight = write_spec(tmp_path, elsewhere, "straight", steps=TOTAL, interval=10, procs=procs)
    train(straight, elsewhere, procs=procs)
    reference = records(straight)
    assert [r["step"] for r in reference] == list(range(1, TOTAL + 1))

    resumed = write_spec(tmp_path, where, "resumed", steps=TOTAL, interval=10, procs=procs)
    run = Run(resumed, where, procs=procs)
    run.wait_for(rf"step {SIGNAL_AFTER}/{TOTAL} ")
    run.proc.send_signal(signal.SIGUSR2)  # what SLURM sends before the time limit
    assert run.wait() == REQUEUE, run.output[-3000:]
    first = run.output
    stop = int(re.search(r"stopping after step (\d+)", first).group(1))
    assert SIGNAL_AFTER <= stop < TOTAL, "the run ended before the signal could stop it"
    assert where.latest() == f"step-{stop}" and where.committed(stop)

    second = train(resumed, where, procs=procs)
    assert f"Training starts at step {stop + 1}" in second
    assert re.search(rf"Loading \S+/step-{stop}\b", second)
    got = records(resumed)
    assert [r["step"] for r in got] == list(range(1, TOTAL + 1))
    for mine, theirs in zip(got, reference, strict=True):
        assert (mine["loss"], mine["grad_norm"], mine["tokens_seen"]) == (
            theirs["loss"], theirs["grad_norm"], theirs["tokens_seen"]), f"step {mine['step']}"
    # keep_latest 2: of the commits (every 10 steps, and the preemption's), the newest two stay.
    assert where.latest() == f"step-{TOTAL}"
    assert where.step_names() == [f"step-{s}" for s in sorted({10, 20, stop, TOTAL})[-2:]]

    manifest = json.loads(where.read(f"step-{TOTAL}/manifest.json"))
    assert manifest["step"] == TOTAL and manifest["world_size"] == procs
    marker = json.loads(where.read(f"step-{TOTAL}/COMMITTED"))
    assert marker["world_size"] == procs and marker["files"] >= procs
    assert manifest["rank_tokens_seen"] * procs == reference[-1]["tokens_seen"]
    assert {"fljob", "torch", "torchtitan", "python"} <= {k for k, v in manifest["versions"].items() if v}
    assert f"uri: {where.uri}" in manifest["spec"]
    if where.server is not None:
        assert SECRET_ENV in manifest["spec"]  # the reference, not the value
    assert_no_secret(where, resumed, first, second)


# --------------------------------------------------------------------------- faults (real S3)


@pytest.mark.parametrize(("daemon", "cause"), [
    ("proxy", r"(?i)connect"),               # nothing listens: connection refused
    ("object", r"(?i)503|unavailable|slow down|internal|error"),  # the proxy answers with errors
])
def test_a_save_that_the_server_refuses_is_not_committed_and_training_goes_on(
        tmp_path: Path, on_s3: Where, daemon: str, cause: str) -> None:
    spec = write_spec(tmp_path, on_s3, "faulty", steps=60, interval=20, keep=3)
    run = Run(spec, on_s3)
    try:
        run.wait_for(r"Committed \S+/step-20 ")
        with run.frozen():
            on_s3.server.stop_daemon(daemon)
        error = run.wait_for(r".*step-40 was not committed.*")
        with run.frozen():
            on_s3.server.start_daemon(daemon)
            assert on_s3.latest() == "step-20" and not on_s3.committed(40)
    finally:
        on_s3.server.start_daemon(daemon)
    assert run.wait() == OK, run.output[-3000:]
    line = error.group(0)
    assert f"checkpoint {on_s3.uri}/step-40 was not committed" in line
    assert re.search(cause, line), line
    assert "newest committed step is still step-20" in line
    assert "training continues" in line
    assert on_s3.latest() == "step-60"
    # Retention removed what the failed save left (older than the newest commit).
    assert on_s3.step_names() == ["step-20", "step-60"]
    assert [r["step"] for r in records(spec)] == list(range(1, 61))
    assert_no_secret(on_s3, spec, run.output)


def test_a_failed_requeue_save_exits_1_and_a_restart_resumes_from_the_last_commit(
        tmp_path: Path, on_s3: Where) -> None:
    spec = write_spec(tmp_path, on_s3, "requeue", steps=100_000, interval=15)
    run = Run(spec, on_s3)
    try:
        run.wait_for(r"Committed \S+/step-15 ")
        with run.frozen():
            on_s3.server.stop_daemon("proxy")
            run.proc.send_signal(signal.SIGUSR2)
        code = run.wait()
    finally:
        on_s3.server.start_daemon("proxy")
    output = run.output
    assert code == FAILED, output[-3000:]  # not REQUEUE: nothing new was committed
    stop = int(re.search(r"stopping after step (\d+)", output).group(1))
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith(f"fljob train: checkpoint {on_s3.uri}/step-{stop} was not committed (")
    assert last_line.endswith("the newest committed step is still step-15")
    assert on_s3.latest() == "step-15"

    again = train(spec, on_s3, f"training.steps={stop + 3}")
    assert re.search(r"Loading \S+/step-15\b", again) and "Training starts at step 16" in again
    assert on_s3.latest() == f"step-{stop + 3}"
    assert_no_secret(on_s3, spec, output, again)


def test_a_trainer_killed_during_an_upload_resumes_from_the_last_commit(
        tmp_path: Path, on_s3: Where) -> None:
    spec = write_spec(tmp_path, on_s3, "killed", steps=100_000, interval=10)
    run = Run(spec, on_s3)
    run.wait_for(r"Committed \S+/step-10 ")
    run.wait_for(r"Saving \S+/step-20\n")
    run.kill()  # SIGKILL: no handler, no clean-up; usually mid-upload of step-20
    newest = 20 if on_s3.committed(20) else 10
    assert on_s3.latest() == f"step-{newest}"

    again = train(spec, on_s3, f"training.steps={newest + 2}")
    assert re.search(rf"Loading \S+/step-{newest}\b", again)
    assert f"Training starts at step {newest + 1}" in again
    assert on_s3.latest() == f"step-{newest + 2}"


def test_a_restart_with_the_server_down_fails_with_one_clear_line(tmp_path: Path, on_s3: Where) -> None:
    """The first thing a run asks the store is the checkpoint location's lease."""
    spec = write_spec(tmp_path, on_s3, "noserver", steps=2, interval=2)
    train(spec, on_s3)
    on_s3.server.stop_daemon("proxy")
    try:
        output = train(spec, on_s3, "training.steps=4", expect=FAILED)
    finally:
        on_s3.server.start_daemon("proxy")
    assert last_line(output).startswith(f"fljob train: cannot lock the checkpoint location {on_s3.uri} "
                                        "(EndpointConnectionError: Could not connect")
    assert_no_secret(on_s3, spec, output)


# --------------------------------------------------------------------------- trust on resume


def test_a_changed_spec_is_refused_or_resumed_as_it_deserves(tmp_path: Path) -> None:
    """Another optimizer would load the saved state silently (every fljob optimizer keeps the
    same state keys): refused with exit 2 and one line. More steps: resumed and logged."""
    where = Where(tmp_path)
    spec = write_spec(tmp_path, where, "changed", steps=4, interval=2, keep=3)
    train(spec, where)
    refused = train(spec, where, "optimizer.name=adamw", expect=USAGE)
    assert last_line(refused) == (
        f"fljob train: cannot resume {where.uri}/step-4: the spec changed what the checkpoint "
        "depends on (optimizer.name 'adopt' -> 'adamw'); set the checkpoint's values again to "
        "resume it, or start fresh with another checkpoint.uri (or another run_dir when "
        "checkpoint.uri is unset)")
    assert where.latest() == "step-4" and where.step_names() == ["step-2", "step-4"]

    longer = train(spec, where, "training.steps=6")
    assert re.search(r"Resuming \S+/step-4 with changed settings: .*training.steps 4 -> 6", longer)
    assert re.search(r"Loading \S+/step-4\b", longer) and "Training starts at step 5" in longer
    assert where.latest() == "step-6"
    manifest = json.loads(where.read("step-6/manifest.json"))
    assert manifest["compatibility"]["optimizer.name"] == "adopt"
    assert manifest["compatibility"]["model.width"] == 64 and manifest["compatibility"]["vocab_size"] > 0


def test_a_truncated_step_is_named_and_resume_falls_back(tmp_path: Path, where: Where) -> None:
    spec = write_spec(tmp_path, where, "truncated", steps=4, interval=2, keep=3)
    train(spec, where)
    marker = json.loads(where.read("step-4/COMMITTED"))
    shard = min(name for name in marker["sizes"] if name.endswith(".distcp"))
    where.write(f"step-4/{shard}", where.read(f"step-4/{shard}")[:100])  # a truncated copy

    again = train(spec, where, "training.steps=6")
    assert (f"{where.uri}/step-4 is damaged ({shard} is 100 bytes, the commit recorded "
            f"{marker['sizes'][shard]}"
            ) in again
    assert "resumes from step-2 instead" in again
    assert re.search(r"Loading \S+/step-2\b", again) and "Training starts at step 3" in again
    # step-4 was saved again from scratch, whole; retention kept the newest three commits.
    assert where.latest() == "step-6" and where.step_names() == ["step-2", "step-4", "step-6"]
    assert json.loads(where.read("step-4/COMMITTED"))["sizes"][shard] > 100
