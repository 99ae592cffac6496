"""TensorBoard and W&B beside Prometheus: the sinks read back with each tool's own reader
(TensorBoard's event accumulator; W&B's offline run file, its protobuf records), and a real
run preempted and resumed through the local backend that keeps one W&B run and one
TensorBoard folder, its steps continuing.

The W&B reader: an offline run is ``run-<id>.wandb``, a 7-byte header (``:W&B``, magic,
version) and then LevelDB-log records (32 KiB blocks; each record a CRC, a length, a type:
full, first, middle, last), each a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import struct
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing import event_accumulator
from test_train import RUN_TIMEOUT_S, fljob_argv, fljob_env, read_metrics, write_spec
from torchtitan.components.metrics import BaseLogger

from fljob import cli
from fljob.exitcodes import REQUEUE
from fljob.spec.models import JobSpec
from fljob.trainer.checkpoint.store import LATEST, MANIFEST, describe_error
from fljob.trainer.metrics.background import BackgroundLogger
from fljob.trainer.metrics.goodput import tracking_id
from fljob.trainer.metrics.tracking import (
    TensorBoardSink,
    WandbSink,
    flatten,
    open_tracking_sinks,
    public_config,
)

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

WANDB_BLOCK = 32768
SECRETS = {"WANDB_API_KEY": "wandb-secret-3e8a51", "HF_TOKEN": "hf-secret-91d2c7"}
PLAIN_ENV_VALUE = "plain-value-7c1f05"


# --------------------------------------------------------------------------- readers


def wandb_records(path: Path) -> list[Any]:
    """Every record of a W&B run file."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zeros: the rest of the block is unused
            pos += left - 7 - length
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run(path: Path) -> tuple[str, dict[tuple[str, int], int], dict[str, Any]]:
    """(run id, {(key, step): times logged}, config) of one offline run file."""
    run_id, logged, config = "", Counter(), {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    logged[(key, record.history.step.num)] += 1
    return run_id, logged, config


def tensorboard_scalars(folder: Path, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (``purge``: restarts honoured)."""
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0},
                                             purge_orphaned_data=purge)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --------------------------------------------------------------------------- units


def test_tracking_id_is_the_labels_when_they_are_a_safe_name_else_sanitised_and_hashed():
    assert tracking_id("tiny", "tiny") == "tiny"
    assert tracking_id("tiny", "1234_7") == "tiny-1234_7"
    odd = tracking_id("tiny", "a/b:c")
    assert re.fullmatch(r"tiny-a-b-c-[0-9a-f]{8}", odd) and odd != tracking_id("tiny", "a-b-c")
    long = tracking_id("x" * 80, "run")
    assert len(long) == 64 and long == tracking_id("x" * 80, "run")


def _record(step: int) -> dict[str, Any]:
    return {"loss": 10.0 - step, "lr": {"hidden": 0.1, "embedding": 0.2}, "elapsed_s": 3.0,
            "optim": {"all": {"update_ratio": 0.01}}, "goodput": {"ratio": 0.5}, "tokens": 7,
            "note": "text"}


def test_records_flatten_into_slash_keys_without_the_process_clock():
    assert flatten(_record(1)) == {"loss": 9.0, "lr/hidden": 0.1, "lr/embedding": 0.2,
                                   "optim/all/update_ratio": 0.01, "goodput/ratio": 0.5,
                                   "tokens": 7.0}


def _private_spec(tmp_path: Path) -> JobSpec:
    return JobSpec.model_validate({
        "name": "tiny", "run_dir": str(tmp_path),
        "env": {"PLAIN_SETTING": PLAIN_ENV_VALUE},
        "secret_env": {"HF_TOKEN": {"env": "HF_TOKEN"}},
        "storage": {"endpoint_url": "http://127.0.0.1:1", "access_key_id": {"env": "KEY_ID_VAR"},
                    "secret_access_key": {"file": "/run/secrets/s3"}},
        "metrics": {"wandb": {"project": "p", "mode": "offline", "api_key": {"env": "WANDB_API_KEY"}}}})


def test_the_wandb_config_is_the_spec_without_env_and_credential_references(tmp_path):
    config = public_config(_private_spec(tmp_path))
    assert "env" not in config and "secret_env" not in config
    assert config["storage"] == {"endpoint_url": "http://127.0.0.1:1", "region": "us-east-1",
                                 "session_token": None}  # no reference set, nothing to hide
    assert "api_key" not in config["metrics"]["wandb"] and config["metrics"]["wandb"]["project"] == "p"
    text = json.dumps(config)
    for leaked in (PLAIN_ENV_VALUE, "KEY_ID_VAR", "/run/secrets/s3", "HF_TOKEN"):
        assert leaked not in text
    assert config["model"]["flavor"] and config["training"]["steps"]


def test_the_wandb_key_is_a_reference_in_every_rendered_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({
        "name": "wb-key", "image": "localhost/fljob:dev", "run_dir": "run", "slurm": {"time": "01:00:00"},
        "metrics": {"wandb": {"project": "p", "api_key": {"env": "WANDB_API_KEY",
                                                          "k8s_secret": {"name": "wandb", "key": "api-key"}}}}}))
    for backend in ("slurm", "k8s", "local"):
        assert cli.main(["render", "--backend", backend, str(spec), "-o", str(tmp_path / backend)]) == 0
    rendered = {p: p.read_text() for b in ("slurm", "k8s", "local") for p in (tmp_path / b).rglob("*")
                if p.is_file()}
    for text in [*rendered.values(), capsys.readouterr().out]:
        assert SECRETS["WANDB_API_KEY"] not in text
    job = rendered[tmp_path / "k8s" / "job.k8s.yaml"]
    assert "name: WANDB_API_KEY" in job and "key: api-key" in job  # from the Secret, at run time
    assert "require_env WANDB_API_KEY" in rendered[tmp_path / "slurm" / "job.sbatch"]


def test_tensorboard_shows_each_step_once_after_a_restart_with_the_resumed_values(tmp_path):
    """A process logs steps 1-5 but only step 3 was committed; the next resumes at 4: the
    TensorBoard reader shows 1-6 once, 4 and 5 as logged again (the raw files hold both)."""
    first = TensorBoardSink(str(tmp_path / "tb"), first_step=1)
    for step in range(1, 6):
        first.log(_record(step), step)
    first.close()
    second = TensorBoardSink(str(tmp_path / "tb"), first_step=4)
    for step in range(4, 7):
        second.log({**_record(step), "loss": 100.0 + step}, step)
    second.close()
    shown = tensorboard_scalars(tmp_path / "tb")
    assert [s for s, _ in shown["loss"]] == [1, 2, 3, 4, 5, 6]
    assert dict(shown["loss"]) == {1: 9.0, 2: 8.0, 3: 7.0, 4: 104.0, 5: 105.0, 6: 106.0}
    assert set(shown) == set(flatten(_record(1)))
    raw = tensorboard_scalars(tmp_path / "tb", purge=False)
    assert [s for s, _ in raw["loss"]] == [1, 2, 3, 4, 5, 4, 5, 6]


@pytest.mark.slow  # two W&B processes a second apart: their folders are named by the second
def test_wandb_offline_runs_of_one_fljob_run_share_the_id_and_carry_no_secret(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    spec = _private_spec(tmp_path)
    for steps in (range(1, 4), range(4, 6)):  # two processes of the run
        sink = WandbSink(spec, "tiny-run-7")
        for step in steps:
            sink.log(_record(step), step)
        sink.close()
        time.sleep(1.1)  # offline run folders are named by the second
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    runs = [wandb_run(f) for f in files]
    assert [r[0] for r in runs] == ["tiny-run-7", "tiny-run-7"]
    logged = runs[0][1] + runs[1][1]
    assert {step for key, step in logged if key == "loss"} == {1, 2, 3, 4, 5}
    assert set(logged.values()) == {1}  # every key at every step once
    assert {key for key, _ in logged} == set(flatten(_record(1)))
    assert runs[0][2]["name"] == "tiny" and "env" not in runs[0][2]
    for path in (tmp_path / "wandb").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for leaked in (*SECRETS.values(), PLAIN_ENV_VALUE):
                assert leaked.encode() not in content, f"{leaked} in {path}"


class _Sink(BaseLogger):
    """A sink that records what it got, after ``delay`` seconds each, or raises ``error``."""

    def __init__(self, delay: float = 0.0, error: Exception | None = None) -> None:
        self.delay, self.error, self.logged, self.closed = delay, error, [], False

    def log(self, metrics: dict[str, Any], step: int) -> None:
        time.sleep(self.delay)
        if self.error:
            raise self.error
        self.logged.append(step)

    def close(self) -> None:
        self.closed = True


def test_a_slow_sink_does_not_slow_the_caller_and_close_waits_for_its_records():
    sink = _Sink(delay=0.02)
    background = BackgroundLogger("Slow", lambda: sink)
    began = time.perf_counter()
    for step in range(1, 21):
        background.log({"loss": 1.0}, step)
    assert time.perf_counter() - began < 0.1  # 20 records, 0.4 s of sink time
    background.close()
    assert sink.logged == list(range(1, 21)) and sink.closed


def test_a_sink_that_falls_behind_drops_records_and_a_hung_one_is_left_behind(caplog):
    hung, got_first = threading.Event(), threading.Event()
    sink = _Sink()
    sink.log = lambda metrics, step: got_first.set() or hung.wait(5)  # type: ignore[method-assign]
    background = BackgroundLogger("Hung", lambda: sink, max_pending=2, close_seconds=0.2)
    background.log({"loss": 1.0}, 1)
    assert got_first.wait(5)  # the thread holds record 1 for good: nothing drains from here on
    with caplog.at_level(logging.WARNING):
        for step in range(2, 10):
            background.log({"loss": 1.0}, step)
        began = time.perf_counter()
        background.close()
    assert time.perf_counter() - began < 1.5
    assert caplog.text.count("Hung falls behind") == 1
    assert "Hung did not finish within 0 s" in caplog.text
    hung.set()


@pytest.mark.parametrize("where", ["open", "log"])
def test_a_failing_sink_is_named_once_with_secrets_masked_and_the_run_goes_on(where, caplog, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    error = RuntimeError(f"401 for key {SECRETS['WANDB_API_KEY']}")
    sink = _Sink(error=error)

    def open_sink() -> BaseLogger:
        if where == "open":
            raise error
        return sink

    background = BackgroundLogger("W&B", open_sink, lambda exc: describe_error(exc, [SECRETS["WANDB_API_KEY"]]))
    with caplog.at_level(logging.WARNING):
        for step in range(1, 6):
            background.log({"loss": 1.0}, step)
        background.close()
    assert background.failed
    failures = [r for r in caplog.records if "W&B is off for this process" in r.getMessage()]
    assert len(failures) == 1, caplog.text
    assert ("could not start" if where == "open" else "failed") in failures[0].getMessage()
    assert "401 for key ***" in caplog.text and SECRETS["WANDB_API_KEY"] not in caplog.text
    assert sink.closed == (where == "log")  # W&B's finish still runs after a failed log


def test_the_spec_sinks_open_off_the_caller_and_an_unwritable_folder_leaves_the_others(tmp_path, caplog):
    (tmp_path / "taken").write_text("a file where the folder goes")
    spec = JobSpec.model_validate({"name": "tiny", "run_dir": str(tmp_path),
                                   "metrics": {"tensorboard": str(tmp_path / "taken"),
                                               "wandb": {"project": "p", "mode": "offline"}}})
    with caplog.at_level(logging.WARNING):
        sinks = open_tracking_sinks(spec, "tiny-1", first_step=1)
        assert [s.name for s in sinks] == ["TensorBoard", "W&B"]
        for sink in sinks:
            sink.log(_record(1), 1)
            sink.close()
    assert "TensorBoard is off for this process: it could not start" in caplog.text
    assert not sinks[1].failed
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert ("loss", 1) in wandb_run(run_file)[1]


# --------------------------------------------------------------------------- a real run


def _submit(spec: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen(fljob_argv("submit", "--backend", "local", str(spec)), cwd=spec.parent,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_logged(run: Path, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        path = run / "metrics.jsonl"
        if path.exists() and sum(1 for line in path.read_text().splitlines() if '"loss"' in line) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {count} logged steps within {RUN_TIMEOUT_S} s")


@pytest.mark.slow
def test_a_preempted_and_resumed_run_keeps_one_wandb_run_and_one_tensorboard_folder(tmp_path):
    """`fljob submit --backend local`, SIGTERM after a few steps (checkpoint, exit 75), then
    submitted again with more steps. The second submit gets a new FLJOB_RUN_ID (the local
    backend makes one per submit), yet W&B and TensorBoard continue the first one's run.

    Asserted: one TensorBoard folder, named by the first process's tracking id, whose raw
    event files hold every step 1..N exactly once (a preemption commits the step it stops
    after, so the resumed process starts at the next: nothing is logged twice); two W&B
    offline run files, both with that id, every key at every step once between them; the
    final record's goodput counts one restart and no lost step; the final checkpoint's
    manifest carries the id; no credential or env value reaches either tracker or the log."""
    spec = write_spec(tmp_path, "adamw", procs=1, steps=100_000, sections={
        "training": {"validation_interval": 2, "validation_batches": 1},
        "env": {"PLAIN_SETTING": PLAIN_ENV_VALUE},
        "secret_env": {"HF_TOKEN": {"env": "HF_TOKEN"}},
        "metrics": {"tensorboard": "tb", "optimizer_interval": 2,
                    "wandb": {"project": "fljob-test", "mode": "offline",
                              "api_key": {"env": "WANDB_API_KEY"}}}})
    run, log = tmp_path / "run", tmp_path / "output.log"
    env = {**fljob_env(), **SECRETS}
    env.pop("FLJOB_RUN_ID", None)
    proc = _submit(spec, log, env)
    try:
        _wait_logged(run, proc, 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=RUN_TIMEOUT_S) == REQUEUE, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = int((run / "checkpoints" / LATEST).read_text().strip().removeprefix("step-"))
    total = stopped + 4
    first_id = json.loads((run / "goodput.json").read_text())["tracking_id"]
    assert re.fullmatch(r"train-adamw-1p-local-\d{8}T\d{6}Z", first_id), first_id

    data = json.loads(spec.read_text())
    data["training"]["steps"] = total
    spec.write_text(json.dumps(data))
    time.sleep(1.1)  # the local backend's run id is by the second
    resumed = _submit(spec, log, env)
    assert resumed.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-3000:]
    output = log.read_text()
    run_ids = set(re.findall(r"run_id=(local-\S+)\)", output))
    assert len(run_ids) == 2, run_ids  # two submits, two FLJOB_RUN_IDs, one tracking id

    assert [p.name for p in (run / "tb").iterdir()] == [first_id]
    raw = tensorboard_scalars(run / "tb" / first_id, purge=False)
    assert [s for s, _ in raw["loss"]] == list(range(1, total + 1))
    assert [s for s, _ in raw["validation_loss"]] == [s for s in range(2, total + 1) if s % 2 == 0 or s == total]
    assert {"lr/hidden", "grad_norm", "tokens_per_s", "optim/all/update_ratio", "goodput/ratio",
            "goodput/restarts"} <= set(raw)

    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    runs = [wandb_run(f) for f in files]
    assert {r[0] for r in runs} == {first_id}
    logged = runs[0][1] + runs[1][1]
    assert sorted(s for k, s in logged if k == "loss") == list(range(1, total + 1))
    assert set(logged.values()) == {1}, [k for k, n in logged.items() if n > 1]
    assert max(s for k, s in runs[0][1]) == stopped and min(s for k, s in runs[1][1]) == stopped + 1

    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert records[-1]["step"] == total
    assert records[-1]["goodput"]["restarts"] == 1 and records[-1]["goodput"]["lost_steps"] == 0
    assert records[0]["goodput"]["restarts"] == 0
    manifest = json.loads((run / "checkpoints" / f"step-{total}" / MANIFEST).read_text())
    assert manifest["run"]["tracking_id"] == first_id and manifest["run"]["goodput"]["attempts"] == 2

    for path in [log, *(run / "wandb").rglob("*"), *(run / "tb").rglob("*")]:
        if path.is_file():
            content = path.read_bytes()
            for leaked in SECRETS.values():
                assert leaked.encode() not in content, f"{leaked} in {path}"
            if path != log:
                assert PLAIN_ENV_VALUE.encode() not in content, path
