"""Goodput across requeues: the ledger's arithmetic on real files, then a real run killed
with SIGKILL past its last commit and resumed, whose lost steps, restarts and checkpoint
carry over (and whose TensorBoard shows each step once, as the resumed process logged it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_tracking import tensorboard_scalars
from test_train import RUN_TIMEOUT_S, fljob_argv, fljob_env, read_metrics, write_spec

from fljob.summary import SUMMARY_FILE
from fljob.trainer.checkpoint.store import LATEST, MANIFEST
from fljob.trainer.metrics.goodput import PROGRESS_FILE, Ledger, RunLedger

TIMES = ("checkpoint_blocked_s", "productive_s", "wall_s", "ratio")  # still running after a record


def _ledger(tmp_path: Path, *, run_id: str = "7", blocked: float = 0.0, started: float | None = None,
            rank0: bool = True) -> RunLedger:
    return RunLedger(job="tiny", run_id=run_id, run_dir=str(tmp_path), blocked_seconds=lambda: blocked,
                     rank0=rank0, started=time.time() - 10 if started is None else started)


def _progress(tmp_path: Path) -> dict:
    return json.loads((tmp_path / PROGRESS_FILE).read_text())


def test_a_fresh_run_counts_one_attempt_and_records_its_steps(tmp_path):
    ledger = _ledger(tmp_path, blocked=1.5)
    ledger.resume(0, None)
    ledger.begin_step()
    time.sleep(0.05)
    ledger.end_step(1)
    m = ledger.metrics()
    assert m["restarts"] == 0 and m["lost_steps"] == 0 and m["checkpoint_blocked_s"] == 1.5
    assert 9.9 < m["startup_s"] < 11 and 0.05 <= m["productive_s"] < 1
    assert m["wall_s"] >= 10 and m["ratio"] == pytest.approx(m["productive_s"] / m["wall_s"], rel=1e-3)
    progress = _progress(tmp_path)
    assert progress["tracking_id"] == "tiny-7" and progress["trained_step"] == 1
    assert progress["goodput"]["attempts"] == 1


def test_a_resume_after_a_kill_counts_the_steps_past_the_checkpoint_as_lost(tmp_path):
    """The killed process trained to step 17 (its progress file), its checkpoint holds step 10."""
    committed = Ledger(attempts=1, lost_steps=0, checkpoint_blocked_s=2.0, productive_s=10.0, wall_s=30.0)
    (tmp_path / PROGRESS_FILE).write_text(json.dumps({
        "tracking_id": "tiny-first", "trained_step": 17,
        "goodput": {"attempts": 1, "lost_steps": 0, "checkpoint_blocked_s": 2.5, "productive_s": 17.0,
                    "wall_s": 45.0}}))
    ledger = _ledger(tmp_path, run_id="second", blocked=0.5, started=time.time() - 5)
    ledger.resume(10, {"run": {"tracking_id": "tiny-first", "goodput": vars(committed)}})
    assert ledger.tracking_id == "tiny-first"  # the checkpoint's, not this process's labels
    t = ledger.totals()
    assert (t.attempts, t.lost_steps) == (2, 7)
    assert t.checkpoint_blocked_s == pytest.approx(3.0)  # the killed process's 2.5 + this one's
    assert t.productive_s == 10.0  # the steps the checkpoint holds, none of the lost ones
    assert 50 <= t.wall_s < 51  # 45 before + 5 of this process
    assert ledger.metrics()["restarts"] == 1
    assert _progress(tmp_path)["goodput"]["lost_steps"] == 7  # a second kill keeps the count


def test_a_graceful_requeue_loses_nothing_and_the_checkpoint_alone_restores_the_totals(tmp_path):
    committed = {"attempts": 2, "lost_steps": 3, "checkpoint_blocked_s": 4.0, "productive_s": 20.0,
                 "wall_s": 60.0}
    ledger = _ledger(tmp_path)
    ledger.resume(20, {"run": {"tracking_id": "tiny-1", "goodput": committed}})  # no progress file
    t = ledger.totals()
    assert (t.attempts, t.lost_steps, t.productive_s) == (3, 3, 20.0)
    (tmp_path / PROGRESS_FILE).write_text(json.dumps({"tracking_id": "tiny-1", "trained_step": 20,
                                                      "goodput": committed}))
    again = _ledger(tmp_path)
    again.resume(20, {"run": {"tracking_id": "tiny-1", "goodput": committed}})
    assert (again.totals().attempts, again.totals().lost_steps) == (3, 3)


def test_progress_of_another_run_or_behind_the_checkpoint_is_ignored(tmp_path):
    for other in ({"tracking_id": "tiny-other", "trained_step": 50},
                  {"tracking_id": "tiny-7", "trained_step": 5}):  # behind the resumed step
        (tmp_path / PROGRESS_FILE).write_text(json.dumps({**other, "goodput": {"attempts": 9,
                                                                                "lost_steps": 9}}))
        ledger = _ledger(tmp_path)
        ledger.resume(8, {"run": {"tracking_id": "tiny-7", "goodput": {"attempts": 1}}})
        assert (ledger.totals().attempts, ledger.totals().lost_steps) == (2, 0)


def test_an_older_checkpoint_without_a_ledger_still_counts_as_a_restart(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.resume(12, {"step": 12, "compatibility": {}})
    assert ledger.metrics()["restarts"] == 1 and ledger.tracking_id == "tiny-7"
    assert Ledger.from_json({"attempts": "x", "wall_s": float("nan"), "lost_steps": -1}) == Ledger()


def test_only_rank0_after_its_resume_writes_the_progress_file(tmp_path):
    previous = {"tracking_id": "tiny-7", "trained_step": 17, "goodput": {"attempts": 1}}
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(previous))
    _ledger(tmp_path).save_progress()  # before the resume: the previous process's file stays
    other = _ledger(tmp_path, rank0=False)
    other.resume(10, None)
    other.end_step(11)
    assert _progress(tmp_path) == previous


@pytest.mark.slow
def test_a_run_killed_past_its_checkpoint_counts_the_lost_steps_and_tensorboard_shows_each_step_once(
        tmp_path: Path) -> None:
    """SIGKILL (no grace, nothing saved) a few steps after a commit, then resume: the lost
    steps are what the killed process trained past the committed step, one restart, the
    checkpoint of the resumed run carries both, and TensorBoard drops the killed process's
    values of the re-trained steps."""
    spec = write_spec(tmp_path, "adamw", procs=1, steps=100_000, sections={
        "checkpoint": {"interval_steps": 5}, "metrics": {"tensorboard": "tb"}})
    run = tmp_path / "run"
    log = tmp_path / "output.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(fljob_argv("train", str(spec)), cwd=tmp_path, env=fljob_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                trained = json.loads((run / PROGRESS_FILE).read_text())["trained_step"]
            except (OSError, ValueError, KeyError):
                trained = 0
            if trained >= 7 and trained % 5 in (2, 3):  # two steps past a commit
                break
            time.sleep(0.01)
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    trained = json.loads((run / PROGRESS_FILE).read_text())["trained_step"]
    committed = int((run / "checkpoints" / LATEST).read_text().strip().removeprefix("step-"))
    lost = trained - committed
    assert lost > 0, (trained, committed)

    data = json.loads(spec.read_text())
    data["training"]["steps"] = total = trained + 3
    spec.write_text(json.dumps(data))
    result = subprocess.run(fljob_argv("train", str(spec)), cwd=tmp_path, env=fljob_env(),
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{lost} steps lost" in result.stderr

    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    final = records[-1]
    assert final["step"] == total
    assert (final["goodput"]["restarts"], final["goodput"]["lost_steps"]) == (1, lost)
    assert 0 < final["goodput"]["ratio"] < 1 and final["goodput"]["checkpoint_blocked_s"] > 0
    manifest = json.loads((run / "checkpoints" / f"step-{total}" / MANIFEST).read_text())
    assert manifest["run"]["goodput"]["attempts"] == 2 and manifest["run"]["goodput"]["lost_steps"] == lost
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["goodput"] == {**final["goodput"], **{k: summary["goodput"][k] for k in TIMES}}
    assert summary["goodput"]["wall_s"] >= final["goodput"]["wall_s"]  # written at the end

    # metrics.jsonl has the re-trained steps twice; TensorBoard shows the resumed values once.
    assert len([r for r in records if committed < r["step"] <= trained]) == 2 * lost
    resumed = {r["step"]: r["loss"] for r in records if r["step"] > committed}  # the later ones
    (folder,) = (run / "tb").iterdir()
    shown = dict(tensorboard_scalars(folder)["loss"])
    assert sorted(shown) == list(range(1, total + 1))
    assert all(shown[s] == pytest.approx(resumed[s], rel=1e-6) for s in resumed)
    assert len(tensorboard_scalars(folder, purge=False)["loss"]) == total + lost  # both in the files
