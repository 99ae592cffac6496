"""`fljob sweep report s3://...` against the real S3 server (Swift, tests/infra/s3.sh).

The trials' summaries reach the bucket the way the trainer puts them there: write_summary
copies each one beside the trial's checkpoints (<checkpoint.uri>/<trial name>/summary.json).
The report finds the trials by listing the prefix, with no sweep.json and no local folder.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from test_sweep_report import LRS, Outcome, build_sweep, standard

from fljob.spec import JobSpec

pytest.importorskip("boto3")

REPO = Path(__file__).resolve().parents[2]
S3_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL",
                "AWS_DEFAULT_REGION")


def fljob(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fljob.cli", *args], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=120, check=False)


def bare_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in S3_VARIABLES}


def server_env(s3_server) -> dict[str, str]:
    return {**bare_env(), **{k: s3_server.env[k] for k in S3_VARIABLES}}


@pytest.fixture(scope="module")
def s3_sweep(s3_server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sweep whose trials copied their summaries to the bucket: one trial has none yet, one
    has a checkpoint but no summary, two diverged."""
    prefix = f"s3://{s3_server.bucket}/sweeps-{uuid.uuid4().hex[:8]}/lrw"

    def outcome(spec: JobSpec) -> Outcome:
        if spec.optimizer.lr == 2.0 ** -12 and spec.model.width == 256:
            return None
        if spec.optimizer.lr == 2.0 ** -6 and spec.model.width == 256:
            return "diverged", math.nan, None
        return standard(spec)

    with pytest.MonkeyPatch.context() as patch:  # write_summary's copy reaches S3 as the trainer's does
        for name in S3_VARIABLES:
            patch.setenv(name, s3_server.env[name])
        build_sweep(tmp_path_factory.mktemp("runs"), outcome, copy=True, checkpoint_uri=prefix,
                    grid={"model.width": [128, 256], "optimizer.lr": LRS, "training.seed": [0, 1]})
    key = prefix.split("/", 3)[3]
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{key}/lrw-14/step-50/.metadata", Body=b"x")
    return prefix


def test_report_from_an_s3_prefix(s3_server, s3_sweep: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = fljob("sweep", "report", s3_sweep, "-o", str(out), env=server_env(s3_server))
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "report.json").read_text())
    assert data["source"] == s3_sweep and data["sweep"] == "lrw"
    assert data["counts"] == {"trials": 28, "completed": 24, "diverged": 2, "unfinished": 0, "failed": 0,
                              "missing": 2}
    assert [t["index"] for t in data["trials"] if t["state"] == "missing"] == [14, 15]
    assert {o["width"]: o["lr"] for o in data["groups"][0]["optima"]} == {128: 2.0 ** -9, 256: 2.0 ** -9}
    assert "muP: optimum moved 0 grid steps from width 128 to 256 (lr 2^-9 -> 2^-9)" in done.stdout
    assert "diverged (2): lrw-26 (muP, width 256, lr 2^-6, seed 0), lrw-27 (" in done.stdout
    assert f"missing summaries (2): trial 14: no readable summary.json under {s3_sweep}" in done.stdout
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"]["width"] == 256 and best["checkpoint"]["uri"] == f"{s3_sweep}/lrw-best"
    assert fljob("validate", str(out / "best.yaml"), env=bare_env()).returncode == 0


def test_the_endpoint_from_the_command_line(s3_server, s3_sweep: str, tmp_path: Path) -> None:
    env = {**bare_env(), "AWS_ACCESS_KEY_ID": s3_server.access_key_id,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_access_key}
    done = fljob("sweep", "report", s3_sweep, "-o", str(tmp_path / "out"), "--endpoint-url",
                 s3_server.endpoint_url, "--region", s3_server.region, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "transfer.png").read_bytes()[:4] == b"\x89PNG"


def test_s3_errors_are_one_line(s3_server, tmp_path: Path) -> None:
    env = server_env(s3_server)
    for runs, words in ((f"s3://{s3_server.bucket}/nothing-{uuid.uuid4().hex[:8]}", "is not a sweep"),
                        (f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", "does not exist")):
        done = fljob("sweep", "report", runs, "-o", str(tmp_path / "out"), env=env)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
