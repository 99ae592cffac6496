"""`fljob data prepare` to the real S3 server (Swift, tests/infra/s3.sh) and training from it,
with held-out streams too (`--validation-fraction`), the run summary copied beside the
checkpoints.

The trainer gets the endpoint and credentials only through the spec's storage references
(variables with other names than AWS_*), and the test secret appears in no log or file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from ports import free_port

pytest.importorskip("torchtitan")

REPO = Path(__file__).resolve().parents[2]
SEQ = 32
S3_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def fljob(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fljob.cli", *args], capture_output=True,
                          text=True, check=False, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO)})


def _bare_env() -> dict[str, str]:
    """This environment without any S3 setting: only what a test passes in counts."""
    return {k: v for k, v in os.environ.items() if k not in S3_VARIABLES}


def _server_env(s3_server) -> dict[str, str]:
    return {**_bare_env(), **{k: s3_server.env[k] for k in S3_VARIABLES if k in s3_server.env}}


def s3_storage(s3_server) -> dict[str, object]:
    """The spec's storage section for the test server, credentials by reference."""
    return {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region,
            "access_key_id": {"env": "FLJOB_TEST_S3_KEY"}, "secret_access_key": {"env": "FLJOB_TEST_S3_SECRET"}}


def s3_env(s3_server) -> dict[str, str]:
    """No S3 setting of this environment, but the values the references in s3_storage name."""
    return {**_bare_env(), "FLJOB_TEST_S3_KEY": s3_server.access_key_id,
            "FLJOB_TEST_S3_SECRET": s3_server.secret_access_key}


def _keys(s3_server, prefix: str) -> set[str]:
    listing = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix + "/")
    return {o["Key"].removeprefix(prefix + "/") for o in listing.get("Contents", [])}


@pytest.fixture(scope="module")
def s3_dataset(s3_server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The bundled corpus prepared locally (BPE trained) and to S3 with that tokenizer,
    given as an s3:// URI."""
    local = tmp_path_factory.mktemp("local") / "pydoc"
    prepared = fljob("data", "prepare", "builtin:pydoc", str(local), "--seq-len", str(SEQ),
                     "--no-progress", env=_bare_env())
    assert prepared.returncode == 0, prepared.stderr
    tokenizer = f"s3://{s3_server.bucket}/tokenizers-{uuid.uuid4().hex[:8]}/tokenizer.json"
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=tokenizer.split("/", 3)[3],
                                  Body=(local / "tokenizer.json").read_bytes())
    uri = f"s3://{s3_server.bucket}/data-{uuid.uuid4().hex[:8]}/pydoc"
    prepared = fljob("data", "prepare", "builtin:pydoc", uri, "--seq-len", str(SEQ),
                     "--tokenizer", tokenizer, "--no-progress", env=_server_env(s3_server))
    assert prepared.returncode == 0, prepared.stderr
    assert s3_server.secret_access_key not in prepared.stdout + prepared.stderr
    return uri, local


def test_prepare_writes_a_complete_dataset_to_s3(s3_server, s3_dataset) -> None:
    uri, local = s3_dataset
    prefix = uri.removeprefix(f"s3://{s3_server.bucket}/")
    keys = _keys(s3_server, prefix)
    assert {"index.json", "fljob_index.json", "tokenizer.json"} <= keys
    assert any(k.endswith(".mds.zstd") for k in keys)
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"{prefix}/fljob_index.json")
    remote_index = json.loads(body["Body"].read())
    assert remote_index == json.loads((local / "fljob_index.json").read_text())  # same samples


def test_loader_reads_the_same_tokens_from_s3_as_from_disk(s3_server, s3_dataset, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from fljob.trainer.data.streaming import StreamingTokenLoader, StreamSource

    uri, local = s3_dataset
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                        ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    for name in S3_VARIABLES:
        if name in s3_server.env:
            monkeypatch.setenv(name, s3_server.env[name])

    def first_batches(source: str, cache: str) -> list[np.ndarray]:
        loader = StreamingTokenLoader([StreamSource(source, str(tmp_path / cache))],
                                      batch_size=4, dp_rank=0, dp_world=1, seed=11)
        it = iter(loader)
        return [next(it)[1].numpy() for _ in range(6)]

    from_s3, from_disk = first_batches(uri, "s3"), first_batches(str(local), "disk")
    assert all((a == b).all() for a, b in zip(from_s3, from_disk, strict=True))
    assert any((tmp_path / "s3").rglob("*.mds*"))  # the shards really came through the cache


def test_fljob_train_from_s3_with_referenced_credentials(s3_server, s3_dataset,
                                                         tmp_path: Path) -> None:
    uri, _ = s3_dataset
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({
        "name": "s3-stream", "run_dir": str(tmp_path / "run"),
        "training": {"steps": 3, "local_batch_size": 2, "seq_len": SEQ},
        "data": {"streams": [{"uri": uri}], "tokenizer": f"{uri}/tokenizer.json"},
        "storage": s3_storage(s3_server),
        "metrics": {"enabled": False, "port": free_port()},
    }))
    env = s3_env(s3_server)
    result = fljob("train", str(spec), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    fetched = (tmp_path / "run" / "data" / "tokenizer.json").read_bytes()  # data.tokenizer URI
    assert fetched == s3_server.client().get_object(
        Bucket=s3_server.bucket, Key=f"{uri.split('/', 3)[3]}/tokenizer.json")["Body"].read()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in metrics]
    assert len(losses) == 3 and all(np.isfinite(losses))
    secret = s3_server.secret_access_key
    assert secret not in result.stdout + result.stderr
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path


def test_split_on_s3_trains_with_held_out_streams_and_copies_the_summary(s3_server,
                                                                       tmp_path: Path) -> None:
    uri = f"s3://{s3_server.bucket}/split-{uuid.uuid4().hex[:8]}"
    prepared = fljob("data", "prepare", "builtin:pydoc", uri, "--seq-len", str(SEQ),
                     "--vocab-size", "512", "--validation-fraction", "0.2", "--no-progress",
                     env=_server_env(s3_server))
    assert prepared.returncode == 0, prepared.stderr
    train, validation = f"{uri}/train", f"{uri}/validation"
    assert (f"data: {{streams: [{{uri: {train}}}], validation: [{{uri: {validation}}}]}}"
            in prepared.stdout)
    prefix = uri.removeprefix(f"s3://{s3_server.bucket}/")
    for split in ("train", "validation"):
        keys = _keys(s3_server, f"{prefix}/{split}")
        assert {"index.json", "fljob_index.json", "tokenizer.json"} <= keys, split

    checkpoints = f"s3://{s3_server.bucket}/ckpt-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({
        "name": "s3-held-out", "run_dir": str(tmp_path / "run"),
        "training": {"steps": 4, "local_batch_size": 2, "seq_len": SEQ,
                     "validation_interval": 2, "validation_batches": 2},
        "data": {"streams": [{"uri": train}], "validation": [{"uri": validation}]},
        "checkpoint": {"uri": checkpoints},
        "storage": s3_storage(s3_server),
        "metrics": {"enabled": False, "port": free_port()},
    }))
    env = s3_env(s3_server)
    result = fljob("train", str(spec), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    held = {r["step"]: r["validation_loss"] for r in rows if "validation_loss" in r}
    assert sorted(held) == [2, 4] and all(np.isfinite(list(held.values())))
    local = (tmp_path / "run" / "summary.json").read_bytes()
    remote = s3_server.client().get_object(
        Bucket=s3_server.bucket, Key=f"{checkpoints.split('/', 3)[3]}/summary.json")["Body"].read()
    assert remote == local
    summary = json.loads(local)
    assert (summary["state"], summary["validation_step"], summary["validation_loss"]) == (
        "completed", 4, held[4])
    assert s3_server.secret_access_key.encode() not in local


def test_prepare_failing_half_way_leaves_no_complete_dataset(s3_server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"text": f"record {i} " + "words " * 40}) for i in range(600)] + ["{bad"]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    prefix = f"broken-{uuid.uuid4().hex[:8]}"
    result = fljob("data", "prepare", str(src), f"s3://{s3_server.bucket}/{prefix}",
                   "--seq-len", str(SEQ), "--vocab-size", "300", "--shard-size", "4kb", "--no-progress",
                   env=_server_env(s3_server))
    assert result.returncode == 2 and "a.jsonl:601" in result.stderr
    assert not {"index.json", "fljob_index.json"} & _keys(s3_server, prefix)


def test_prepare_with_a_wrong_secret_or_endpoint_exits_2(s3_server, tmp_path: Path) -> None:
    wrong = {**_server_env(s3_server), "AWS_SECRET_ACCESS_KEY": "fljob-wrong-secret-91b3"}
    result = fljob("data", "prepare", "builtin:pydoc", f"s3://{s3_server.bucket}/x", "--no-progress",
                   env=wrong)
    assert result.returncode == 2 and "refused access" in result.stderr
    assert "fljob-wrong-secret-91b3" not in result.stderr and "Traceback" not in result.stderr

    result = fljob("data", "prepare", "builtin:pydoc", f"s3://{s3_server.bucket}/x", "--no-progress",
                   "--endpoint-url", f"http://127.0.0.1:{free_port()}", env=_server_env(s3_server))
    assert result.returncode == 2 and "cannot reach the S3 endpoint" in result.stderr


@pytest.mark.slow
def test_resume_from_s3_continues_the_s3_stream_bitwise(s3_server, s3_dataset,
                                                        tmp_path: Path) -> None:
    """Data and checkpoints on the real server, 2 data-parallel ranks: 6 steps in one go ==
    3 steps, stop, resume for 3 more (constant learning rate: only the restored state counts)."""
    uri, _ = s3_dataset
    checkpoints = f"s3://{s3_server.bucket}/ckpt-{uuid.uuid4().hex[:8]}"
    env = s3_env(s3_server)

    def run(name: str, steps: int) -> list[tuple[int, float]]:
        spec = tmp_path / f"{name}-{steps}.yaml"
        spec.write_text(json.dumps({
            "name": "s3-resume", "run_dir": str(tmp_path / name),
            "resources": {"procs_per_node": 2},
            "training": {"steps": steps, "local_batch_size": 2, "seq_len": SEQ},
            "schedule": {"decay_ratio": 0.01},
            "data": {"streams": [{"uri": uri}]},
            "checkpoint": {"uri": f"{checkpoints}/{name}"},
            "storage": {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region,
                        "access_key_id": {"env": "FLJOB_TEST_S3_KEY"},
                        "secret_access_key": {"env": "FLJOB_TEST_S3_SECRET"}},
            "metrics": {"enabled": False, "port": free_port()},
        }))
        result = fljob("submit", "--backend", "local", str(spec), env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, rows)]

    straight = run("straight", 6)
    run("stopped", 3)
    stopped_and_resumed = run("stopped", 6)
    assert [step for step, _ in stopped_and_resumed] == [1, 2, 3, 4, 5, 6]  # resumed at 4
    assert stopped_and_resumed == straight


def test_fljob_train_with_an_unreachable_endpoint_or_wrong_secret_exits_2(
        s3_server, s3_dataset, tmp_path: Path) -> None:
    uri, _ = s3_dataset
    for endpoint, secret, needle in (
            (f"http://127.0.0.1:{free_port()}", s3_server.secret_access_key, "cannot reach"),
            (s3_server.endpoint_url, "fljob-wrong-secret-77aa", "refused access")):
        spec = tmp_path / "spec.yaml"
        spec.write_text(json.dumps({
            "name": "s3-bad", "run_dir": str(tmp_path / "run"),
            "training": {"steps": 1, "seq_len": SEQ}, "data": {"streams": [{"uri": uri}]},
            "storage": {"endpoint_url": endpoint,
                        "access_key_id": {"env": "FLJOB_TEST_S3_KEY"},
                        "secret_access_key": {"env": "FLJOB_TEST_S3_SECRET"}},
            "metrics": {"enabled": False, "port": free_port()},
        }))
        env = {**_bare_env(), "FLJOB_TEST_S3_KEY": s3_server.access_key_id,
               "FLJOB_TEST_S3_SECRET": secret}
        result = fljob("train", str(spec), env=env)
        assert result.returncode == 2 and needle in result.stderr, result.stderr[-2000:]
        assert secret not in result.stderr and "Traceback" not in result.stderr
