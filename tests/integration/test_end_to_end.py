"""The whole mission in one run, as a user does it, on real SLURM, S3 (Swift) and Prometheus.

`fljob data prepare` uploads the bundled corpus to the S3 server; `fljob submit --backend
slurm` trains the tiny muP model with 2 tasks (gloo) on the single-node cluster, streaming
from S3 and checkpointing to S3; Prometheus scrapes rank 0 through the file_sd target the job
writes. Mid-run the job gets SLURM's pre-kill signal (USR2 to the batch shell): the trainer
checkpoints, exits 75, the batch script requeues it and the next attempt resumes. Later every trainer
process is killed (SIGKILL) with no warning; a new submission resumes from the last committed step,
losing at most one checkpoint interval. The loss of every step equals that of an
uninterrupted run of the same spec (bitwise: CPU, same world size, restored data order).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from ports import free_port

pytest.importorskip("torchtitan")
pytestmark = pytest.mark.slow

FLJOB = Path(sys.executable).parent / "fljob"
HANDLE = re.compile(r"^slurm://(\d+)$", re.MULTILINE)
SEQ = 32
STEPS = 36
INTERVAL = 4
KEY_VAR, SECRET_VAR = "FLJOB_E2E_S3_KEY", "FLJOB_E2E_S3_SECRET"


def _fljob(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(FLJOB), *args], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert not check or proc.returncode == 0, f"fljob {' '.join(args)}: {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def _wait(what: str, condition: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged step, in the order written (attempts append)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [(row["step"], row["loss"]) for row in map(json.loads, path.read_text().splitlines())]


def _last_step(run_dir: Path) -> int:
    rows = _losses(run_dir)
    return rows[-1][0] if rows else 0


@pytest.fixture(scope="module")
def dataset(s3_server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled corpus as MDS shards on the S3 server, with its trained tokenizer beside them."""
    uri = f"s3://{s3_server.bucket}/e2e-{uuid.uuid4().hex[:8]}/pydoc"
    _fljob(s3_server.env, "data", "prepare", "builtin:pydoc", uri, "--seq-len", str(SEQ), "--no-progress")
    return uri


def _spec(tmp: Path, name: str, dataset: str, s3_server, prometheus_stack) -> Path:
    spec = {
        "name": name,
        "run_dir": str(tmp / name),
        "resources": {"nodes": 1, "procs_per_node": 2},
        "slurm": {"time": "00:15:00", "max_restarts": 2, "signal": "USR2", "grace_seconds": 30,
                  "rdzv_port": free_port()},
        "training": {"steps": STEPS, "local_batch_size": 2, "seq_len": SEQ, "log_interval": 1},
        "schedule": {"warmup_steps": 4},
        "data": {"streams": [{"uri": dataset}], "tokenizer": f"{dataset}/tokenizer.json"},
        "checkpoint": {"uri": f"s3://{s3_server.bucket}/e2e-{uuid.uuid4().hex[:8]}/{name}",
                       "interval_steps": INTERVAL, "keep_latest": 2},
        "metrics": {"port": free_port(), "optimizer_interval": 4,
                    "file_sd_dir": str(prometheus_stack["targets"])},
        "storage": {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region,
                    "access_key_id": {"env": KEY_VAR}, "secret_access_key": {"env": SECRET_VAR}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _job_env(cluster_env: dict[str, str], s3_server) -> dict[str, str]:
    """The submitter's environment: SLURM's, and the credentials under the names the spec references."""
    env = {k: v for k, v in cluster_env.items() if not k.startswith(("AWS_", "S3_"))}
    return {**env, KEY_VAR: s3_server.access_key_id, SECRET_VAR: s3_server.secret_access_key}


def _submit(env: dict[str, str], spec: Path) -> str:
    match = HANDLE.search(_fljob(env, "submit", "--backend", "slurm", str(spec)).stdout)
    assert match, "fljob submit printed no slurm://<id> handle"
    return match.group(1)


def _state(env: dict[str, str], job_id: str) -> str:
    return _fljob(env, "status", f"slurm://{job_id}").stdout.split()[1]


def _kill_workers(run_dir: Path) -> None:
    """SIGKILL every trainer process of the run at once, as the OOM killer or a node crash would.

    Not `scancel --signal=KILL`: when the killed srun takes the step down, slurmstepd sends the
    tasks SIGTERM first, and a trainer that wins that race checkpoints as if preempted.
    """
    workers = subprocess.run(["pgrep", "-f", f"bin/fljob train {run_dir}/spec.yaml"], capture_output=True,
                             text=True, check=False).stdout.split()
    assert len(workers) == 2, f"expected the 2 trainer processes, found {workers}"
    subprocess.run(["kill", "-KILL", *workers], check=True)


def _query_range(prometheus: str, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_slurm_s3_prometheus_preemption_and_hard_kill(slurm_cluster, s3_server, prometheus_stack, dataset,
                                                       tmp_path: Path) -> None:
    env = _job_env(slurm_cluster, s3_server)
    started = time.time()

    # The anchor: the same spec, uninterrupted, on this machine (same world size of 2).
    reference = _spec(tmp_path, "e2e-reference", dataset, s3_server, prometheus_stack)
    _fljob(env, "submit", "--backend", "local", str(reference))
    expected = dict(_losses(tmp_path / "e2e-reference"))
    assert sorted(expected) == list(range(1, STEPS + 1))

    spec = _spec(tmp_path, "e2e-slurm", dataset, s3_server, prometheus_stack)
    run_dir = tmp_path / "e2e-slurm"
    job_id = _submit(env, spec)
    target = prometheus_stack["targets"] / f"e2e-slurm-{job_id}.json"

    # 1. SLURM's pre-kill signal: checkpoint, exit 75, requeue, resume.
    _wait("step 6 of the first attempt", lambda: _last_step(run_dir) >= 6, 240)
    _wait("the file_sd target of the running job", target.exists, 30)
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], env=env, check=True, timeout=60)
    _wait("the requeued attempt to start", lambda: "restarts=1" in _fljob(env, "status", f"slurm://{job_id}").stdout, 180)
    stopped = re.search(r"stopping after step (\d+)", _fljob(env, "logs", f"slurm://{job_id}").stdout)
    assert stopped, "the trainer did not report where it stopped"
    preempted_at = int(stopped.group(1))

    # 2. A hard kill, no warning, once the requeued attempt has committed a checkpoint of its own.
    _wait("the requeued attempt to pass a checkpoint",
          lambda: _last_step(run_dir) >= preempted_at + INTERVAL + 2, 240)
    _kill_workers(run_dir)
    _wait("the killed job to end", lambda: _state(env, job_id) not in ("RUNNING", "PENDING", "REQUEUED"), 120)
    killed_after = _last_step(run_dir)
    rows_before = len(_losses(run_dir))

    second_id = _submit(env, spec)
    _wait("the resubmitted job to finish",
          lambda: _state(env, second_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300)
    status = _fljob(env, "status", f"slurm://{second_id}").stdout
    assert " COMPLETED " in f" {status} ", status

    # The resubmission resumed from a committed step at most one interval before the kill.
    resumed_from = _losses(run_dir)[rows_before][0] - 1
    story = (f"preempted after step {preempted_at}, killed after step {killed_after}, resumed from "
             f"{resumed_from}; steps logged: {[step for step, _ in _losses(run_dir)]}")
    assert killed_after - INTERVAL <= resumed_from <= killed_after, story
    assert resumed_from % INTERVAL == 0, story

    # Every step's loss equals the uninterrupted run's: the last value logged for each step wins.
    got = dict(_losses(run_dir))
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected, [s for s in expected if got.get(s) != expected[s]]

    # status and logs of the preempted job tell the story.
    first = _fljob(env, "status", f"slurm://{job_id}").stdout
    assert "restarts=1" in first, first
    log = _fljob(env, "logs", f"slurm://{job_id}").stdout
    assert "forwarding to the training step" in log and "requeue 1 of 2" in log
    assert re.search(r"step +\d+/36 +loss", log), log[-2000:]
    assert s3_server.secret_access_key not in log

    # Prometheus scraped the job through its file_sd target; the target is gone at the end.
    assert not (prometheus_stack["targets"] / f"e2e-slurm-{second_id}.json").exists()
    series = _query_range(prometheus_stack["prometheus"], 'fljob_step{job="e2e-slurm"}', started, time.time())
    run_ids = {s["metric"]["run_id"] for s in series}
    assert {job_id, second_id} <= run_ids, run_ids
    assert max(float(v) for s in series for _, v in s["values"]) == STEPS
