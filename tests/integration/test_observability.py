"""A real CPU training run scraped by a real Prometheus; every dashboard query answered.

tests/infra/prometheus.sh starts Prometheus (1 s scrapes of the file_sd folder) and a
Pushgateway. One tiny training run (`fljob submit --backend local`) has both scraping modes
on: rank 0 publishes its file_sd target and pushes to the gateway. While it runs the test
watches the target file, /metrics and the gateway's groups; afterwards it asks Prometheus,
through its HTTP API, for every query of the generated Grafana dashboard over the run's time
range. Skips, naming the Debian packages, where Prometheus is not installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fljob.exitcodes import REQUEUE
from fljob.observability import dashboards

REPO = Path(__file__).resolve().parents[2]
METRICS_PORT = 19462
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval for 1 s scrapes, with margin for slow steps


def _get_json(url: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(url + query, timeout=10) as r:
        return json.loads(r.read())


def _get_text(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


@dataclass
class ObservedRun:
    job: str
    run_id: str
    start: float
    end: float = 0.0
    returncode: int | None = None
    target_file: dict | None = None       # the file_sd JSON as seen during the run
    target_left: bool = True              # the file still exists after the run
    exposition: str | None = None         # /metrics with optimizer statistics in it
    pushed_groups: list[dict] = field(default_factory=list)  # gateway groups of this run, during
    groups_after: list[dict] = field(default_factory=list)   # ... and after the run
    log: str = ""


def _run_groups(gateway: str, run_id: str) -> list[dict]:
    data = _get_json(f"{gateway}/api/v1/metrics")["data"]
    return [g for g in data if g["labels"].get("run_id") == run_id]


FLJOB = Path(sys.executable).parent / "fljob"


def _submit(stack: dict, tmp: Path, job: str, run_id: str, steps: int, linger_s: int) -> subprocess.Popen:
    """Start `fljob submit --backend local` on a tiny spec with file_sd and Pushgateway on, and
    held-out evaluations every 4 steps (the held-out loss panel has data)."""
    spec = {
        "name": job, "run_dir": str(tmp / "run"),
        "training": {"steps": steps, "local_batch_size": 4, "seq_len": 64, "log_interval": 1,
                     "validation_interval": 4, "validation_batches": 2},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"uri": str(tmp / "checkpoints"), "interval_steps": 8},
        "metrics": {"port": METRICS_PORT, "optimizer_interval": 2,
                    "file_sd_dir": str(stack["targets"]),
                    "pushgateway": {"url": stack["pushgateway"], "interval_seconds": 0.5}},
    }
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    # FLJOB_* variables ride in the submitting environment (a spec may not set them).
    env = dict(os.environ, FLJOB_RUN_ID=run_id, FLJOB_METRICS_LINGER_SECONDS=str(linger_s))
    with open(tmp / "submit.log", "w") as out:
        return subprocess.Popen([str(FLJOB), "submit", "--backend", "local", str(tmp / "spec.yaml")],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def observed_run(prometheus_stack, tmp_path_factory) -> ObservedRun:
    """Train the tiny model once with file_sd and Pushgateway on, watching both."""
    tmp = tmp_path_factory.mktemp("run")
    run = ObservedRun(job="obs-e2e", run_id=f"e2e-{os.getpid()}-{int(time.time())}", start=time.time())
    target = prometheus_stack["targets"] / f"{run.job}-{run.run_id}.json"
    # Keep /metrics up 3 s after the last step so that 1 s scrapes see the final values.
    proc = _submit(prometheus_stack, tmp, run.job, run.run_id, steps=16, linger_s=3)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if target.exists():
            run.target_file = json.loads(target.read_text())
        text = _get_text(f"http://127.0.0.1:{METRICS_PORT}/metrics")
        if text and "fljob_optimizer_update_ratio{" in text:
            run.exposition = text
        run.pushed_groups = _run_groups(prometheus_stack["pushgateway"], run.run_id) or run.pushed_groups
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    run.returncode = proc.wait()
    run.end = time.time()
    run.log = (tmp / "submit.log").read_text()
    run.target_left = target.exists()
    run.groups_after = _run_groups(prometheus_stack["pushgateway"], run.run_id)
    assert run.returncode == 0, run.log[-3000:]
    return run


def test_the_job_publishes_its_file_sd_target_and_removes_it(observed_run):
    assert observed_run.target_file is not None, "no target file appeared during the run"
    (entry,) = observed_run.target_file
    assert entry["targets"] == [f"{socket.gethostname()}:{METRICS_PORT}"]
    assert entry["labels"] == {"job": observed_run.job, "run_id": observed_run.run_id}
    assert not observed_run.target_left


def test_promtool_accepts_the_live_exposition(observed_run):
    assert observed_run.exposition, "never scraped /metrics with optimizer statistics"
    proc = subprocess.run(["promtool", "check", "metrics"], input=observed_run.exposition.encode(),
                          capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_pushgateway_mode_pushes_and_deletes_its_group(observed_run):
    assert observed_run.pushed_groups, "the run's group never appeared on the Pushgateway"
    (group,) = observed_run.pushed_groups
    assert group["labels"] == {"job": observed_run.job, "run_id": observed_run.run_id}
    assert "fljob_loss" in group and "fljob_step" in group
    assert observed_run.groups_after == []


def _query_range(prometheus: str, expr: str, run: ObservedRun) -> list[dict]:
    answer = _get_json(f"{prometheus}/api/v1/query_range", query=expr, start=f"{run.start:.3f}",
                       end=f"{run.end + 5:.3f}", step="1")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _finite_values(result: list[dict]) -> list[float]:
    return [float(v) for s in result for _, v in s["values"] if math.isfinite(float(v))]


def test_prometheus_scraped_the_run_through_file_sd(prometheus_stack, observed_run):
    result = _query_range(prometheus_stack["prometheus"], f'up{{run_id="{observed_run.run_id}"}}',
                          observed_run)
    assert result and max(_finite_values(result)) == 1.0
    steps = _query_range(prometheus_stack["prometheus"],
                         f'fljob_step{{run_id="{observed_run.run_id}"}}', observed_run)
    assert max(_finite_values(steps)) == 16  # the last step was scraped (the linger)


def test_goodput_of_a_run_without_restarts(prometheus_stack, observed_run):
    """One process, two checkpoints (steps 8 and 16), nothing lost: the last scraped values."""
    def last(name: str) -> float:
        result = _query_range(prometheus_stack["prometheus"], f'{name}{{run_id="{observed_run.run_id}"}}',
                              observed_run)
        return _finite_values(result)[-1]

    assert last("fljob_goodput_restarts") == 0 and last("fljob_goodput_lost_steps") == 0
    wall, productive = last("fljob_goodput_wall_seconds"), last("fljob_goodput_productive_seconds")
    assert 0 < productive < wall < observed_run.end - observed_run.start + 60
    assert last("fljob_goodput_ratio") == pytest.approx(productive / wall, rel=1e-6)
    assert 0 < last("fljob_goodput_startup_seconds") < wall
    assert last("fljob_goodput_checkpoint_blocked_seconds") > 0  # step 8's save, before step 9's record


def test_every_dashboard_query_returns_data(prometheus_stack, observed_run):
    empty = []
    answered = {}
    for panel in dashboards.training_dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", RATE_INTERVAL)
                    .replace("$job", observed_run.job).replace("$run_id", observed_run.run_id))
            values = _finite_values(_query_range(prometheus_stack["prometheus"], expr, observed_run))
            if not values:
                empty.append(f"{panel['title']} [{target['refId']}]: {expr}")
            else:
                answered[f"{panel['title']} [{target['refId']}]"] = values[-1]
    sys.stderr.write("\n" + "\n".join(f"  {k}: {v:.6g}" for k, v in answered.items()) + "\n")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    goodput_row = next(r for r in dashboards.training_rows() if r.title.startswith("Goodput"))
    assert {p.title for p in goodput_row.panels} <= {k.split(" [")[0] for k in answered}


def test_a_cancelled_run_removes_its_target_and_group(prometheus_stack, tmp_path):
    """`fljob cancel` sends SIGTERM: the run checkpoints, exits 75 (requeue) and cleans up."""
    job, run_id = "obs-term", f"term-{os.getpid()}-{int(time.time())}"
    target = prometheus_stack["targets"] / f"{job}-{run_id}.json"
    proc = _submit(prometheus_stack, tmp_path, job, run_id, steps=10_000, linger_s=0)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        step = re.search(r"^fljob_step\{.*\} (\S+)$", _get_text(f"http://127.0.0.1:{METRICS_PORT}/metrics")
                         or "", re.MULTILINE)
        pushed = _run_groups(prometheus_stack["pushgateway"], run_id)
        if target.exists() and pushed and step and float(step.group(1)) >= 3:
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it was signalled:\n" + \
        (tmp_path / "submit.log").read_text()[-3000:]
    subprocess.run([str(FLJOB), "cancel", f"local://{tmp_path / 'run'}"], check=True, timeout=30)
    assert proc.wait(timeout=120) == REQUEUE, (tmp_path / "submit.log").read_text()[-3000:]
    assert not target.exists()
    assert _run_groups(prometheus_stack["pushgateway"], run_id) == []
