"""TensorBoard to the real S3 server (Swift, tests/infra/s3.sh): event files written in a
staging folder and uploaded whole, rotated by size, an outage ridden out, and a real
`fljob train` whose scalars TensorBoard's reader finds in the bucket.

The files are read back by downloading the run's prefix and handing the folder to
TensorBoard's event accumulator; the trainer gets the endpoint and credentials only through
the spec's storage references, and the test secret appears in no uploaded file or log.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from ports import free_port

pytest.importorskip("torchtitan")

from tensorboard.backend.event_processing import event_accumulator

from fljob.spec.models import Storage
from fljob.storage import storage_environment
from fljob.trainer.metrics.tracking import TensorBoardSink

REPO = Path(__file__).resolve().parents[2]
S3_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def _download(s3_server, prefix: str, into: Path) -> list[str]:
    """Every object under ``prefix/`` into ``into``; their names, sorted."""
    client = s3_server.client()
    listing = client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix + "/").get("Contents", [])
    into.mkdir(parents=True, exist_ok=True)
    names = sorted(o["Key"].removeprefix(prefix + "/") for o in listing)
    for name in names:
        (into / name).write_bytes(client.get_object(Bucket=s3_server.bucket,
                                                    Key=f"{prefix}/{name}")["Body"].read())
    return names


def _loss_steps(folder: Path) -> list[int]:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("loss")]


@pytest.fixture
def s3_environment(s3_server, monkeypatch) -> None:
    """This process's environment as `fljob train` sets it for the test server."""
    for name in S3_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    storage = Storage.model_validate({"endpoint_url": s3_server.endpoint_url, "region": s3_server.region})
    for name, value in {**storage_environment(storage, {}),
                        "AWS_ACCESS_KEY_ID": s3_server.access_key_id,
                        "AWS_SECRET_ACCESS_KEY": s3_server.secret_access_key}.items():
        monkeypatch.setenv(name, value)


def test_event_files_are_uploaded_rotated_and_survive_an_outage(s3_server, s3_environment, tmp_path,
                                                                caplog):
    prefix = f"tb-{uuid.uuid4().hex[:8]}/run"
    staging = tmp_path / "staging"
    # Upload at every record, and rotate every time (any file is past 1 byte).
    sink = TensorBoardSink(f"s3://{s3_server.bucket}/{prefix}", first_step=1, staging=staging,
                           upload_seconds=0, rotate_bytes=1)
    for step in (1, 2, 3):
        sink.log({"loss": 10.0 - step}, step)
    s3_server.stop_daemon("proxy")
    try:
        with caplog.at_level(logging.WARNING):
            sink.log({"loss": 6.0}, 4)
            sink.log({"loss": 5.0}, 5)
    finally:
        s3_server.start_daemon("proxy")
    assert caplog.text.count("TensorBoard: cannot upload") == 1  # once per outage
    assert len(list(staging.iterdir())) == 3  # steps 4 and 5's closed files wait, a new one is open
    sink.log({"loss": 4.0}, 6)
    sink.close()
    assert list(staging.iterdir()) == []  # everything up, nothing left behind
    names = _download(s3_server, prefix, tmp_path / "down")
    # One file per record (each rotated), and the one opened after the last, closed at the end.
    assert len(names) == 7 and all(n.startswith("events.out.tfevents.") for n in names)
    assert _loss_steps(tmp_path / "down") == [1, 2, 3, 4, 5, 6]


def test_the_next_process_uploads_what_a_killed_one_left_and_its_restart_hides_lost_steps(
        s3_server, s3_environment, tmp_path):
    """A process logs steps 1-3 (committed: step 1) and is killed before any upload; the next
    resumes at step 2 in the same staging folder: both processes' files reach the bucket, and
    TensorBoard shows each step once, 2 and 3 as the second process logged them."""
    prefix = f"tb-{uuid.uuid4().hex[:8]}/run"
    uri, staging = f"s3://{s3_server.bucket}/{prefix}", tmp_path / "staging"
    killed = TensorBoardSink(uri, first_step=1, staging=staging, upload_seconds=3600)
    for step in (1, 2, 3):
        killed.log({"loss": 10.0 - step}, step)
    killed._writer.flush()  # what the OS has when the process dies; it never closes or uploads
    resumed = TensorBoardSink(uri, first_step=2, staging=staging, upload_seconds=0)
    for step in (2, 3, 4):
        resumed.log({"loss": 100.0 + step}, step)
    resumed.close()
    assert list(staging.iterdir()) == []
    assert len(_download(s3_server, prefix, tmp_path / "down")) == 2
    acc = event_accumulator.EventAccumulator(str(tmp_path / "down"),
                                             size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 9.0), (2, 102.0), (3, 103.0),
                                                                (4, 104.0)]


def test_a_training_run_writes_its_tensorboard_folder_to_s3(s3_server, tmp_path):
    prefix = f"tb-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({
        "name": "tb-s3", "run_dir": str(tmp_path / "run"),
        "training": {"steps": 6, "local_batch_size": 2, "seq_len": 32, "device": "cpu"},
        "storage": {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region,
                    "access_key_id": {"env": "FLJOB_TEST_S3_KEY"},
                    "secret_access_key": {"env": "FLJOB_TEST_S3_SECRET"}},
        "metrics": {"port": free_port(), "tensorboard": f"s3://{s3_server.bucket}/{prefix}"},
    }))
    env = {**{k: v for k, v in os.environ.items() if k not in S3_VARIABLES},
           "FLJOB_TEST_S3_KEY": s3_server.access_key_id,
           "FLJOB_TEST_S3_SECRET": s3_server.secret_access_key, "PYTHONPATH": str(REPO)}
    env.pop("FLJOB_RUN_ID", None)
    result = subprocess.run([sys.executable, "-m", "fljob.cli", "train", str(spec)], capture_output=True,
                            text=True, check=False, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    names = _download(s3_server, f"{prefix}/tb-s3", tmp_path / "down")  # <uri>/<tracking id>
    assert names, "nothing uploaded"
    assert _loss_steps(tmp_path / "down") == [1, 2, 3, 4, 5, 6]
    assert not any((tmp_path / "run" / "tensorboard-upload").rglob("events.*"))
    secret = s3_server.secret_access_key.encode()
    assert secret not in (result.stdout + result.stderr).encode()
    assert all(secret not in p.read_bytes() for p in (tmp_path / "down").iterdir())
