"""SLURM backend I/O: submit the rendered batch script through submitit; status, logs, cancel.

Rendering is ``slurm_render.render`` (pure). ``submit`` writes its files into the spec's run
dir and hands the script to a ``submitit.SlurmExecutor`` whose submission text *is* that
script, unchanged: what ``fljob render`` shows is byte for byte what sbatch receives (submitit
keeps its copy as ``<run_dir>/submitit/<jobid>_submission.sh``). States come from submitit's
sacct watcher, with ``scontrol`` for jobs sacct does not know yet (or on clusters without
accounting). Every job is recorded in ``<run_dir>/jobs.json`` and in a per-user index
(``$XDG_STATE_HOME/fljob/slurm-jobs.json``) so ``fljob logs`` finds the log after the job has
left slurmctld's memory.

Anything the user can fix (no sbatch, no reachable controller, sbatch rejecting the job, an
unknown job id) is a UsageError whose message says what to do.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fljob.backends import slurm_render, submitit_glue
from fljob.backends.base import (
    Handle,
    JobState,
    JobStatus,
    Submission,
    SweepStatus,
    Task,
    put_this_fljob_on_path,
    run_progress,
)
from fljob.backends.slurm_render import check, render
from fljob.doctor import slurm_checks as doctor_checks
from fljob.errors import UsageError
from fljob.exitcodes import DIVERGED, REQUEUE
from fljob.files import held_lock
from fljob.spec import JobSpec
from fljob.spec.sweep import SWEEP_INDEX_FILE

NAME = "slurm"
__all__ = ["NAME", "cancel", "check", "doctor_checks", "logs", "plan", "render", "status", "submit"]

SUBMITIT_DIR = "submitit"
JOBS_FILE = "jobs.json"
USER_INDEX_LIMIT = 2000

# How long `logs --follow` sleeps between reads / state checks.
FOLLOW_POLL_S = 0.5
STATE_POLL_S = 1.0

CONTROLLER_HINT = (
    "no SLURM controller answered. Export SLURM_CONF=<path of your cluster's slurm.conf> (for "
    "fljob's test cluster: source <(tests/infra/slurm.sh env)) and check that `scontrol ping` "
    "reaches slurmctld"
)


# --------------------------------------------------------------------------- running SLURM tools


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise UsageError(
            f"{tool} is not on PATH: run fljob where the SLURM client commands are installed (a "
            "login node), or install them (Debian/Ubuntu: apt-get install slurm-client)"
        )
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise UsageError(f"SLURM_CONF={conf} is not a file: point it at your cluster's slurm.conf")
    return path


UNREACHABLE = ("configuration source", "Unable to contact slurm controller", "Connection refused",
               "fetch_config", "Zero Bytes were transmitted")


def _slurm_error(tool: str, stderr: str, action: str, hint: str = "") -> UsageError:
    text = " ".join(stderr.split()) or "(no message)"
    if any(u in text for u in UNREACHABLE):
        return UsageError(f"{action}: {CONTROLLER_HINT}. {tool} said: {text}")
    return UsageError(f"{action}: {tool} said: {text}" + (f". {hint}" if hint else ""))


@contextlib.contextmanager
def _captured_fd2() -> Iterator[io.StringIO]:
    """Keep what child processes write to fd 2 (submitit lets sacct's stderr through) off the terminal."""
    import logging
    import tempfile

    box = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    submitit_log = logging.getLogger("submitit")
    level = submitit_log.level
    submitit_log.setLevel(logging.ERROR)  # "Bypassing sacct error": we fall back to scontrol
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            submitit_log.setLevel(level)
            tmp.seek(0)
            box.write(tmp.read().decode("utf-8", "replace"))


def _run(argv: list[str], action: str) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client command; a missing tool or unreachable controller is a UsageError."""
    _require(argv[0])
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{action}: {shlex.join(argv)} did not answer in 120 s: {CONTROLLER_HINT}") from None


def _scontrol_records(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o`: one record per line (an array job has one per task or pending
    range); exact and immediate while slurmctld remembers the job, else []."""
    proc = _run(["scontrol", "show", "job", "-o", job_id], f"looking up slurm://{job_id}")
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return []
        raise _slurm_error("scontrol", proc.stderr, f"looking up slurm://{job_id}")
    records = []
    for line in proc.stdout.strip().splitlines():
        info: dict[str, str] = {}
        for word in line.split():
            key, sep, value = word.partition("=")
            if sep and key not in info:
                info[key] = value
        if info:
            records.append(info)
    return records


def _scontrol_job(job_id: str) -> dict[str, str] | None:
    records = _scontrol_records(job_id)
    return records[0] if records else None


def _sacct_job(job_id: str) -> dict[str, str]:
    """The job's accounting record through submitit's sacct watcher ({} when sacct has none)."""
    _require("sacct")
    with _captured_fd2():
        return submitit_glue.sacct_info(job_id)


def _job_id(handle: Handle) -> str:
    if handle.backend != "slurm":
        raise UsageError(f"{handle} is not a SLURM job handle")
    return handle.ident


# --------------------------------------------------------------------------- the job index


def user_index_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "fljob" / "slurm-jobs.json"


@contextlib.contextmanager
def _locked_json(path: Path, default: Any) -> Iterator[list[Any]]:
    """Read-modify-write a JSON file under an exclusive lock, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with held_lock(path.with_name(f".{path.name}.lock")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = default
        box = [data]
        yield box
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(box[0], indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)


def _record(entry: dict[str, Any]) -> None:
    run_dir = Path(entry["run_dir"])
    with _locked_json(run_dir / JOBS_FILE, {"jobs": []}) as box:
        if not isinstance(box[0], dict) or not isinstance(box[0].get("jobs"), list):
            box[0] = {"jobs": []}
        box[0]["jobs"].append(entry)
    try:
        with _locked_json(user_index_path(), {}) as box:
            index = box[0] if isinstance(box[0], dict) else {}
            index.setdefault(entry["job_id"], []).append(
                {k: entry[k] for k in ("run_dir", "log", "name", "workdir", "submitted_at", "slurm_conf", "task")}
            )
            if len(index) > USER_INDEX_LIMIT:  # keep the newest ids
                for old in sorted(index, key=lambda j: index[j][-1]["submitted_at"])[: len(index) - USER_INDEX_LIMIT]:
                    del index[old]
            box[0] = index
    except OSError as exc:  # the per-user index is a convenience; the job was submitted
        print(f"fljob: could not update {user_index_path()}: {exc}", file=sys.stderr)


def _indexed_entry(job_id: str, sacct: dict[str, str] | None = None) -> dict[str, Any] | None:
    """What fljob recorded when it submitted this id (an array task: its array's entry); when
    ids repeat (another cluster), the entry sacct agrees with, else the newest."""
    try:
        index = json.loads(user_index_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entries = index.get(job_id.partition("_")[0]) if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries:
        return None
    conf = os.environ.get("SLURM_CONF")
    if sacct:
        matching = [e for e in entries if e.get("name") == sacct.get("JobName")
                    and (not sacct.get("WorkDir") or e.get("workdir") == sacct.get("WorkDir"))]
        entries = matching or entries
    same_cluster = [e for e in entries if e.get("slurm_conf") == conf]
    entry = (same_cluster or entries)[-1]
    return entry if isinstance(entry, dict) and isinstance(entry.get("run_dir"), str) else None


def _indexed_log(job_id: str, sacct: dict[str, str]) -> Path | None:
    entry = _indexed_entry(job_id, sacct)
    if entry is None or not isinstance(entry.get("log"), str):
        return None
    base, _, task = job_id.partition("_")
    if task:  # the array's log pattern, for this task
        return Path(entry["run_dir"]) / slurm_render.ARRAY_LOG_PATTERN.replace("%A", base).replace("%a", task)
    return Path(entry["log"])


# --------------------------------------------------------------------------- submit


def plan(spec: JobSpec, task: Task = "train") -> Submission:
    """The dry run: the batch script (one array job for a sweep) and the files beside it."""
    folder = Path(spec.resolved_run_dir).absolute()
    files = tuple(render(spec, task))
    return Submission(NAME, folder, files, f"sbatch {shlex.quote(str(folder / slurm_render.SCRIPT_FILE))}",
                      spec, task)


def submit(plan: Submission) -> Handle:
    """sbatch the plan's script through submitit (byte for byte the rendered one)."""
    _require("sbatch")
    _require("srun")  # submitit's SlurmExecutor insists on it
    spec, folder = plan.spec, plan.folder
    plan.write()
    put_this_fljob_on_path()  # the job inherits this environment
    script_path = folder / slurm_render.SCRIPT_FILE
    script = next(f for f in plan.files if f.name == slurm_render.SCRIPT_FILE).content
    try:
        job_id, copy = submitit_glue.submit_script(folder / SUBMITIT_DIR, script, tasks=spec.resources.nodes)
    except submitit_glue.SbatchRefused as exc:
        raise _slurm_error("sbatch", str(exc), f"sbatch did not accept {script_path}",
                           "Check the spec's resources and slurm fields against `sinfo`") from None
    pattern = slurm_render.ARRAY_LOG_PATTERN if spec.sweep else slurm_render.LOG_PATTERN
    log = folder / pattern.replace("%j", job_id).replace("%A", job_id)
    _record({
        "job_id": job_id,
        "task": plan.task,
        "sweep": spec.sweep is not None,
        "name": spec.name,
        "run_dir": str(folder),
        "log": str(log),
        "script": str(script_path),
        "submitted_copy": str(copy),
        "workdir": str(Path.cwd()),
        "slurm_conf": os.environ.get("SLURM_CONF"),
        "submitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    what = f"a sweep of {spec.sweep.size} trials (array job)" if spec.sweep else "SLURM job"
    print(f"fljob: submitted {spec.name} as {what} {job_id}; log {log}", file=sys.stderr)
    return Handle(NAME, job_id)


# --------------------------------------------------------------------------- status


def _query(job_id: str) -> tuple[dict[str, str], dict[str, str] | None]:
    """(sacct record through submitit, scontrol record); UsageError when neither knows the job."""
    live = _scontrol_job(job_id)  # first: it reports an unreachable controller clearly
    sacct = _sacct_job(job_id)
    if not sacct and live is None:
        raise UsageError(
            f"slurm://{job_id}: no such job (neither sacct nor scontrol knows it). Use the handle "
            "`fljob submit` printed, with SLURM_CONF naming the cluster it went to"
        )
    return sacct, live


def _state_word(state: str) -> str:
    return state.split()[0].rstrip("+") if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED


NATIVE_STATES: dict[str, JobState] = {
    **dict.fromkeys(("PENDING", "CONFIGURING", "RESV_DEL_HOLD", "SUSPENDED", "STOPPED"), JobState.PENDING),
    **dict.fromkeys(("RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"), JobState.RUNNING),
    **dict.fromkeys(("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"), JobState.REQUEUED),
    "COMPLETED": JobState.COMPLETED,
    **dict.fromkeys(("CANCELLED", "REVOKED"), JobState.CANCELLED),
    "PREEMPTED": JobState.PREEMPTED,
    **dict.fromkeys(("FAILED", "BOOT_FAIL", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "DEADLINE",
                     "SPECIAL_EXIT"), JobState.FAILED),
}


def _ended(native: str | None) -> bool:
    """Nothing more happens to a job in this state (None: no tool knows the job any more)."""
    return native is None or NATIVE_STATES.get(native, JobState.UNKNOWN).ended


def job_state(native: str, exit_code: int | None) -> JobState:
    """fljob's state for a SLURM state word and the batch script's exit code: a job that
    failed with the trainer's requeue code (its requeue budget spent) is PREEMPTED, with its
    diverged code DIVERGED."""
    state = NATIVE_STATES.get(native, JobState.UNKNOWN)
    if state is JobState.FAILED and exit_code == REQUEUE:
        return JobState.PREEMPTED
    if state is JobState.FAILED and exit_code == DIVERGED:
        return JobState.DIVERGED
    return state


def _exit_code(text: str) -> tuple[int | None, str]:
    """'3:0' -> (3, ''); '0:15' -> (0, '15') (the signal); '' -> (None, '')."""
    code, _, sig = text.partition(":")
    return (int(code) if code.isdigit() else None), ("" if sig in ("", "0") else sig)


def _job_status(handle: str, native: str, exit_text: str, run_dir: Path | None, log: Path | None,
                details: list[tuple[str, str]], name: str | None = None) -> JobStatus:
    code, sig = _exit_code(exit_text)
    state = job_state(native, code)
    if not state.ended:
        code, sig = None, ""
    if sig:
        details.insert(0, ("signal", sig))
    progress = run_progress(run_dir) if run_dir else None
    return JobStatus(handle, state, native=native, exit_code=code,
                     step=progress and progress.step, steps=progress and progress.steps,
                     loss=progress and progress.loss, validation_loss=progress and progress.validation_loss,
                     logs=str(log) if log else None, details=tuple(details), name=name)


def status(handle: Handle) -> JobStatus | SweepStatus:
    job_id = _job_id(handle)
    entry = _indexed_entry(job_id)
    run_dir = Path(entry["run_dir"]) if entry else None
    if run_dir is not None and "_" not in job_id and (run_dir / SWEEP_INDEX_FILE).is_file():
        return _sweep_status(handle, job_id, run_dir)
    sacct, live = _query(job_id)
    # scontrol is exact while slurmctld holds the job; sacct (submitit's watcher) after that.
    native = (live or {}).get("JobState") or _state_word(sacct.get("State", ""))
    details: list[tuple[str, str]] = []
    if live and NATIVE_STATES.get(native) in (JobState.PENDING, JobState.REQUEUED) \
            and live.get("Reason") not in (None, "None"):
        details.append(("reason", live["Reason"]))
    if live and "Restarts" in live:
        details.append(("restarts", live["Restarts"]))
    elapsed = (live or {}).get("RunTime") or sacct.get("Elapsed")
    if elapsed:
        details.append(("elapsed", elapsed))
    exit_text = (live or {}).get("ExitCode") or sacct.get("ExitCode", "")
    return _job_status(str(handle), native, exit_text, run_dir if "_" not in job_id else None,
                       _log_path(job_id, sacct, live), details)


def _array_tasks(job_id: str) -> dict[int, tuple[str, str, str]]:
    """task index -> (state, exit code, restarts) of an array job: sacct for tasks that ran,
    scontrol (exact while slurmctld holds them) on top; pending ranges ('2-5%2') expanded."""
    tasks: dict[int, tuple[str, str, str]] = {}
    done = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode"], f"looking up slurm://{job_id}")
    lines = [line.split("|") for line in done.stdout.splitlines() if line.count("|") == 2] if done.returncode == 0 else []
    for task_id, state, code in lines:
        for index in _task_indices(task_id.partition("_")[2]):
            tasks[index] = (_state_word(state), code, "")
    for live in _scontrol_records(job_id):
        for index in _task_indices(live.get("ArrayTaskId", "")):
            tasks[index] = (live.get("JobState", "UNKNOWN"), live.get("ExitCode", ""), live.get("Restarts", ""))
    return tasks


def _task_indices(text: str) -> list[int]:
    """'3' -> [3]; '[2-5%2]' or '2-5%2' -> [2, 3, 4, 5]; '1,4-5' -> [1, 4, 5]."""
    out: list[int] = []
    for part in text.strip("[]").split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            out += range(int(low), int(high or low) + 1)
    return out


def _sweep_status(handle: Handle, job_id: str, run_dir: Path) -> SweepStatus:
    index = json.loads((run_dir / SWEEP_INDEX_FILE).read_text(encoding="utf-8"))
    tasks = _array_tasks(job_id)
    trials = []
    for trial in index["trials"]:
        i = trial["index"]
        native, exit_text, restarts = tasks.get(i, ("UNKNOWN", "", ""))
        details = [("restarts", restarts)] if restarts else []
        log = run_dir / slurm_render.ARRAY_LOG_PATTERN.replace("%A", job_id).replace("%a", str(i))
        trials.append(_job_status(f"slurm://{job_id}_{i}", native, exit_text, run_dir / trial["name"], log,
                                  details, name=trial["name"]))
    return SweepStatus(str(handle), index["sweep"], tuple(trials))


# --------------------------------------------------------------------------- logs


def _log_path(job_id: str, sacct: dict[str, str], live: dict[str, str] | None) -> Path | None:
    if live and live.get("StdOut"):
        base, _, task = job_id.partition("_")
        return Path(live["StdOut"].replace("%j", live.get("JobId", job_id)).replace("%x", live.get("JobName", ""))
                    .replace("%A", base).replace("%a", task))
    return _indexed_log(job_id, sacct)


def _live_state(job_id: str) -> str | None:
    """The job's state now (None once no tool knows it any more)."""
    live = _scontrol_job(job_id)
    if live is not None:
        return live.get("JobState")
    sacct = _sacct_job(job_id)
    return _state_word(sacct["State"]) if sacct.get("State") else None


def logs(handle: Handle, follow: bool = False) -> Iterator[str]:
    job_id = _job_id(handle)
    sacct, live = _query(job_id)
    path = _log_path(job_id, sacct, live)
    if path is None:
        raise UsageError(
            f"slurm://{job_id} has left slurmctld's memory and was not submitted by fljob from this "
            f"account ({user_index_path()} has no entry), so its log path is unknown"
        )
    state = (live or {}).get("JobState") or _state_word(sacct.get("State", ""))
    if not follow:
        if not path.exists():
            when = "ended" if _ended(state) else "is"
            print(f"fljob logs: slurm://{job_id} {when} {state}; it wrote no output ({path} does not exist)",
                  file=sys.stderr)
            return
        yield from _read_chunks(path)
        return
    yield from _follow(job_id, path)


def _read_chunks(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


def _follow(job_id: str, path: Path) -> Iterator[str]:
    """tail -f until the job reaches a terminal state (requeues keep appending to the same file)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset = 0
    next_check = 0.0
    done = False
    while True:
        now = time.monotonic()
        if now >= next_check:
            state = _live_state(job_id)
            done = _ended(state)
            next_check = now + STATE_POLL_S
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                while chunk := f.read(1 << 16):
                    offset += len(chunk)
                    text = decoder.decode(chunk)
                    if text:
                        yield text
        if done:  # the state was read before this last read: nothing can follow it
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
            return
        time.sleep(FOLLOW_POLL_S)


# --------------------------------------------------------------------------- cancel


def cancel(handle: Handle) -> None:
    job_id = _job_id(handle)
    sacct, live = _query(job_id)
    state = (live or {}).get("JobState") or _state_word(sacct.get("State", ""))
    if _ended(state):
        raise UsageError(f"slurm://{job_id} already ended ({state}); there is nothing to cancel")
    _require("scancel")
    try:
        submitit_glue.cancel(job_id, Path(sacct.get("WorkDir") or Path.cwd()) / SUBMITIT_DIR)
    except subprocess.CalledProcessError as exc:
        raise UsageError(f"scancel {job_id} failed (exit {exc.returncode}); see its message above") from None
