"""`fljob submit/status/logs/cancel --backend slurm` against a real SLURM cluster.

The cluster is the project's own (tests/infra/slurm.sh, started by the `slurm_cluster`
fixture). Every job runs the real rendered batch script, the real `fljob launch` (torchrun)
and the real distributed doctor or a worker whose behaviour `worker_hook/sitecustomize.py`
sets (keep running, ask for a requeue, react to SIGUSR2 like the trainer): the batch
script, its signal trap and its requeue trailer are exactly what users get.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from ports import free_port

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HOOK_DIR = Path(__file__).resolve().parent / "worker_hook"
HANDLE = re.compile(r"^slurm://(\d+)$", re.MULTILINE)


class Cluster:
    """Runs `fljob` and SLURM's tools in the test cluster's environment."""

    def __init__(self, env: dict[str, str], tmp: Path):
        self.env = {**env, "XDG_STATE_HOME": str(tmp / "state")}
        self.tmp = tmp
        self.jobs: list[str] = []

    def run(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(argv), env=self.env, cwd=self.tmp, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def fljob(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        return self.run("fljob", *args, **kw)

    def spec(self, name: str, **slurm: object) -> Path:
        fields = {"rdzv_port": free_port(), "time": "00:10:00", **slurm}
        text = (f"name: {name}\n"
                "resources: {nodes: 1, procs_per_node: 2}\n"
                f"slurm: {json.dumps(fields)}\n")
        path = self.tmp / f"{name}.yaml"
        path.write_text(text)
        return path

    def submit(self, spec: Path, *sets: str, env: dict[str, str] | None = None) -> tuple[str, Path]:
        """Submit the doctor task; `env` is added to the submitting environment (the job inherits it)."""
        run_dir = self.tmp / "run"
        args = ["submit", "--backend", "slurm", str(spec), "--doctor", "--set", f"run_dir={run_dir}"]
        for s in sets:
            args += ["--set", s]
        proc = subprocess.run(["fljob", *args], env={**self.env, **(env or {})}, cwd=self.tmp,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        match = HANDLE.search(proc.stdout)
        assert match, f"no slurm://<id> handle in {proc.stdout!r}"
        self.jobs.append(match.group(1))
        return match.group(1), run_dir

    def hooked(self, spec: Path, mode: str, *sets: str) -> tuple[str, Path, Path]:
        """The worker hook rides in the submitting environment: a spec may not set PYTHONPATH or
        FLJOB_* (they would change what runs), but sbatch passes the environment on."""
        markers = self.tmp / "markers"
        job_id, run_dir = self.submit(spec, *sets, env={"PYTHONPATH": str(HOOK_DIR), "FLJOB_TEST_WORKER": mode,
                                                        "FLJOB_TEST_MARKERS": str(markers)})
        return job_id, run_dir, markers

    def status(self, job_id: str) -> str:
        return self.fljob("status", f"slurm://{job_id}").stdout.strip()

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        end = time.monotonic() + timeout
        line = ""
        while time.monotonic() < end:
            line = self.status(job_id)
            if line.split()[1] in states:
                return line
            time.sleep(0.5)
        raise AssertionError(f"slurm://{job_id} did not reach {states} in {timeout} s; last: {line}\n"
                             f"{self.fljob('logs', f'slurm://{job_id}', check=False).stdout}")

    def sacct(self, job_id: str) -> list[tuple[str, str]]:
        """(State, ExitCode) of every run of the job, requeued ones included (sacct -D)."""
        out = self.run("sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode").stdout
        return [(s.split()[0], code) for s, code in (line.split("|") for line in out.splitlines() if line)]

    def cleanup(self) -> None:
        for job_id in self.jobs:
            self.run("scancel", job_id, check=False)


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def markers(folder: Path, prefix: str) -> list[Path]:
    return sorted(folder.glob(f"{prefix}*")) if folder.exists() else []


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def cluster(slurm_cluster, tmp_path):
    c = Cluster(slurm_cluster, tmp_path)
    yield c
    c.cleanup()


# --------------------------------------------------------------------------- (a) submit, status, logs


def test_doctor_job_runs_two_ranks_and_completes(cluster):
    spec = cluster.spec("slurm-doctor")
    job_id, run_dir = cluster.submit(spec)
    handle = f"slurm://{job_id}"

    # follow from the start: it streams while the job runs and returns once it has ended
    t0 = time.monotonic()
    followed = cluster.fljob("logs", "-f", handle, timeout=180).stdout
    print(f"logs -f returned {time.monotonic() - t0:.1f} s after submit")

    line = cluster.status(job_id)
    assert line.split()[:2] == [handle, "COMPLETED"], line
    assert "exit_code=0" in line and f"logs={run_dir}/slurm-{job_id}.out" in line, line

    logs = cluster.fljob("logs", handle).stdout
    for text in (followed, logs):
        for rank in (0, 1):  # the two ranks may print into one file at once: match within lines too
            assert re.search(rf"fljob doctor: rank={rank} world_size=2 .*?all_reduce_sum=1 expected=1 ok", text), text
        assert "fljob: step finished with exit code 0" in text, text
    assert f"fljob: job {job_id} restart 0 on 1 node(s)" in logs

    # what sbatch received is byte for byte what `fljob render` shows
    rendered = cluster.fljob("render", "--backend", "slurm", str(spec), "--doctor", "--set", f"run_dir={run_dir}",
                             "-o", str(cluster.tmp / "rendered")).stdout
    assert rendered
    submitted = run_dir / "submitit" / f"{job_id}_submission.sh"
    assert submitted.read_bytes() == (cluster.tmp / "rendered" / "job.sbatch").read_bytes()
    assert (run_dir / "job.sbatch").read_bytes() == submitted.read_bytes()

    # the job is indexed beside the run and for this user
    jobs = json.loads((run_dir / "jobs.json").read_text())["jobs"]
    assert [j["job_id"] for j in jobs] == [job_id] and jobs[0]["task"] == "doctor"
    index = json.loads((cluster.tmp / "state" / "fljob" / "slurm-jobs.json").read_text())
    assert index[job_id][-1]["log"] == f"{run_dir}/slurm-{job_id}.out"
    assert cluster.sacct(job_id) == [("COMPLETED", "0:0")]


def test_logs_found_through_the_index_after_the_controller_forgets(cluster, monkeypatch):
    """Once slurmctld has purged a job (MinJobAge), the log path comes from the user index."""
    from fljob.backends import slurm
    from fljob.backends.base import Handle

    spec = cluster.spec("slurm-index")
    job_id, _ = cluster.submit(spec)
    cluster.wait_state(job_id, {"COMPLETED", "FAILED"}, timeout=120)
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(slurm, "_scontrol_job", lambda _id: None)  # as if purged from slurmctld
    text = "".join(slurm.logs(Handle("slurm", job_id), follow=False))
    assert "fljob doctor: rank=0 world_size=2" in text
    assert slurm.status(Handle("slurm", job_id)).state.value == "COMPLETED"  # from sacct alone


def test_dry_run_and_user_errors(cluster):
    spec = cluster.spec("slurm-dry")
    before = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    out = cluster.fljob("submit", "--backend", "slurm", str(spec), "--set", f"run_dir={cluster.tmp / 'dry'}",
                        "--dry-run").stdout
    assert f"then run: sbatch {cluster.tmp / 'dry' / 'job.sbatch'}" in out and "nothing written, nothing run" in out
    assert not HANDLE.search(out)
    assert cluster.run("squeue", "-h", "-o", "%i").stdout.split() == before
    assert not (cluster.tmp / "dry").exists()

    unknown = cluster.fljob("status", "slurm://987654", check=False)
    assert unknown.returncode == 2 and "no such job" in unknown.stderr and "Traceback" not in unknown.stderr

    rejected = cluster.fljob("submit", "--backend", "slurm", str(spec), "--set", f"run_dir={cluster.tmp / 'bad'}",
                             "--set", "slurm.partition=no-such-partition", check=False)
    assert rejected.returncode == 2, rejected
    assert "invalid partition" in rejected.stderr.lower() and "Traceback" not in rejected.stderr

    no_conf = subprocess.run(["fljob", "status", "slurm://1"], env={**cluster.env, "SLURM_CONF": "/nonexistent"},
                             capture_output=True, text=True, timeout=60, check=False)
    assert no_conf.returncode == 2 and "SLURM_CONF" in no_conf.stderr


# --------------------------------------------------------------------------- (b) cancel


def test_cancel_stops_a_running_job(cluster):
    spec = cluster.spec("slurm-cancel")
    job_id, _, mark = cluster.hooked(spec, "hang")
    wait_for(lambda: len(markers(mark, "started-")) == 2, 120, "both workers to start")
    pids = [int(p.name.rsplit("-p", 1)[1]) for p in markers(mark, "started-")]
    assert all(pid_alive(p) for p in pids)
    assert cluster.status(job_id).split()[1] == "RUNNING"

    t0 = time.monotonic()
    out = cluster.fljob("cancel", f"slurm://{job_id}").stdout
    assert "cancel requested" in out
    line = cluster.wait_state(job_id, {"CANCELLED"}, timeout=60)
    wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "the workers to be killed")
    print(f"cancel -> CANCELLED and workers gone in {time.monotonic() - t0:.1f} s")
    assert "signal=15" in line or "exit_code=0" in line, line
    assert "step finished with exit code" not in cluster.fljob("logs", f"slurm://{job_id}").stdout

    again = cluster.fljob("cancel", f"slurm://{job_id}", check=False)
    assert again.returncode == 2 and "already ended (CANCELLED)" in again.stderr


# --------------------------------------------------------------------------- (c) requeue trailer


def test_requeue_trailer_stops_at_the_budget(cluster):
    spec = cluster.spec("slurm-requeue", max_restarts=2)
    job_id, _, _ = cluster.hooked(spec, "exit75")
    t0 = time.monotonic()
    line = cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "PREEMPTED"}, timeout=240)
    print(f"3 runs with 2 requeues in {time.monotonic() - t0:.1f} s")
    # SLURM says FAILED; with the trainer's requeue code that is "checkpointed, no retry left".
    assert line.split()[1:4] == ["PREEMPTED", "native=FAILED", "exit_code=75"] and "restarts=2" in line, line

    log = cluster.fljob("logs", f"slurm://{job_id}").stdout
    starts = re.findall(rf"fljob: job {job_id} restart (\d+) on", log)
    assert starts == ["0", "1", "2"], log
    assert "requeue 1 of 2" in log and "requeue 2 of 2" in log and "requeue 3 of" not in log
    assert "requeue budget of 2 spent; not requeueing" in log
    assert log.count("fljob launch: workers exited with [75]") == 3
    assert cluster.sacct(job_id) == [("REQUEUED", "0:0"), ("REQUEUED", "0:0"), ("FAILED", "75:0")]


# --------------------------------------------------------------------------- (d) pre-kill signal


def test_usr2_reaches_the_workers_and_the_job_requeues(cluster):
    spec = cluster.spec("slurm-signal", max_restarts=1)
    job_id, _, mark = cluster.hooked(spec, "usr2")
    wait_for(lambda: len(markers(mark, "started-")) == 2, 120, "both workers to start")
    assert not markers(mark, "usr2-")

    # what SLURM does at --signal=B:USR2@grace: signal the batch shell only
    t0 = time.monotonic()
    cluster.run("scancel", "--signal=USR2", "--batch", job_id)
    wait_for(lambda: len(markers(mark, "usr2-")) == 2, 30, "SIGUSR2 to reach both workers")
    assert [p.name for p in markers(mark, "usr2-")] == ["usr2-r0-a0", "usr2-r1-a0"]
    # the workers exited 75, the trailer requeued, and the next run started
    wait_for(lambda: len(markers(mark, "started-r")) == 4, 120, "the requeued run to start")
    print(f"USR2 -> requeued run started in {time.monotonic() - t0:.1f} s")
    assert {p.name.rsplit("-p", 1)[0] for p in markers(mark, "started-")} == {
        "started-r0-a0", "started-r1-a0", "started-r0-a1", "started-r1-a1"}

    log = cluster.fljob("logs", f"slurm://{job_id}").stdout
    assert "fljob: SIGUSR2 received; forwarding to the training step" in log
    assert "fljob launch: workers exited with [75]" in log
    assert "requeue 1 of 1" in log
    assert f"fljob: job {job_id} restart 1 on" in log
    assert "restarts=1" in cluster.status(job_id)

    cluster.fljob("cancel", f"slurm://{job_id}")
    cluster.wait_state(job_id, {"CANCELLED"}, timeout=60)
    assert [s for s, _ in cluster.sacct(job_id)] == ["REQUEUED", "CANCELLED"]


# --------------------------------------------------------------------------- (d) a sweep as one array job


def test_sweep_is_one_array_job_each_task_training_its_trial(cluster):
    """Three trials of the tiny model, two at a time: one sbatch, each array task reads its
    trial from trials.tsv, trains it in its own folder, and status shows the table."""
    spec = cluster.tmp / "sweep.yaml"
    spec.write_text(
        "name: slurm-sweep\n"
        f"run_dir: {cluster.tmp / 'sweep'}\n"
        f"slurm: {{time: '00:10:00', rdzv_port: {free_port()}}}\n"
        "training: {steps: 3, local_batch_size: 2, seq_len: 32}\n"
        "metrics: {enabled: false}\n"
        "sweep: {grid: {optimizer.lr: [0.001, 0.003, 0.01]}, parallel: 2}\n")
    out = cluster.fljob("submit", "--backend", "slurm", str(spec)).stdout
    job_id = HANDLE.search(out).group(1)
    cluster.jobs.append(job_id)
    folder = cluster.tmp / "sweep"
    script = (folder / "job.sbatch").read_text()
    assert "#SBATCH --array=0-2%2" in script and f"#SBATCH --output={folder}/slurm-%A_%a.out" in script

    def finished() -> bool:
        lines = cluster.fljob("status", f"slurm://{job_id}").stdout.splitlines()[2:]
        return len(lines) == 3 and all(line.split()[2] in ("COMPLETED", "FAILED") for line in lines)

    wait_for(finished, 300, "every trial of the array to end")
    status = cluster.fljob("status", f"slurm://{job_id}").stdout.splitlines()
    assert status[0] == f"slurm://{job_id} SWEEP slurm-sweep: 3 trials: 3 COMPLETED", "\n".join(status)
    for i, line in enumerate(status[2:]):
        _, name, state, step, *_ = line.split()
        assert (name, state, step) == (f"slurm-sweep-{i}", "COMPLETED", "3/3"), line
        log = (folder / f"slurm-{job_id}_{i}.out").read_text()
        assert f"trial {i} (slurm-sweep-{i})" in log
        records = [json.loads(r) for r in (folder / f"slurm-sweep-{i}" / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == 3
        assert records[-1]["lr"]  # trained with this trial's learning rate (warm-up: a fraction of it)
    task = json.loads(cluster.fljob("status", "--json", f"slurm://{job_id}_1").stdout)
    assert task["state"] == "COMPLETED" and task["logs"] == str(folder / f"slurm-{job_id}_1.out")
    assert "slurm-sweep-1" in cluster.fljob("logs", f"slurm://{job_id}_1").stdout
