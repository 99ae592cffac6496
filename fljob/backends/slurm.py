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
import fcntl
import functools
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

from fljob.backends import slurm_render
from fljob.backends.base import Handle, Task, put_this_fljob_on_path
from fljob.errors import UsageError
from fljob.spec import JobSpec

SUBMITIT_DIR = "submitit"
JOBS_FILE = "jobs.json"
USER_INDEX_LIMIT = 2000

# Job states after which nothing more happens to the job (squeue/sacct long names).
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "REVOKED", "TIMEOUT",
})
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


def _scontrol_job(job_id: str) -> dict[str, str] | None:
    """`scontrol show job -o`: exact and immediate while slurmctld remembers the job, else None."""
    proc = _run(["scontrol", "show", "job", "-o", job_id], f"looking up slurm://{job_id}")
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None
        raise _slurm_error("scontrol", proc.stderr, f"looking up slurm://{job_id}")
    line = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    info: dict[str, str] = {}
    for word in line.split():
        key, sep, value = word.partition("=")
        if sep and key not in info:
            info[key] = value
    return info or None


def _sacct_job(job_id: str) -> dict[str, str]:
    """The job's accounting record through submitit's sacct watcher ({} when sacct has none)."""
    _require("sacct")
    with _captured_fd2():
        return _sacct_watcher_class()(delay_s=600).get_info(job_id, mode="force")


def _job_id(handle: Handle) -> str:
    if handle.backend != "slurm":
        raise UsageError(f"{handle} is not a SLURM job handle")
    return handle.ident


# --------------------------------------------------------------------------- submitit glue


def _submitit() -> Any:
    import submitit  # only the commands that act need it

    return submitit


@functools.cache
def _sacct_watcher_class() -> type:
    """submitit's SlurmInfoWatcher, asking sacct for the exit code and elapsed time too."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SacctWatcher(SlurmInfoWatcher):
        def _make_command(self) -> list[str] | None:
            command = super()._make_command()
            if command is not None:
                command[command.index("-o") + 1] = "JobID,State,ExitCode,Elapsed,NodeList,JobName,WorkDir"
            return command

    return SacctWatcher


def _executor(folder: Path, script: str, tasks: int) -> Any:
    """A submitit SlurmExecutor whose submission file is our rendered script, unchanged."""
    submitit = _submitit()

    class RenderedScriptExecutor(submitit.SlurmExecutor):
        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return script

        def _num_tasks(self) -> int:
            return tasks

    return RenderedScriptExecutor(folder=folder)


# --------------------------------------------------------------------------- the job index


def user_index_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "fljob" / "slurm-jobs.json"


@contextlib.contextmanager
def _locked_json(path: Path, default: Any) -> Iterator[list[Any]]:
    """Read-modify-write a JSON file under an exclusive lock, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
                {k: entry[k] for k in ("run_dir", "log", "name", "workdir", "submitted_at", "slurm_conf")}
            )
            if len(index) > USER_INDEX_LIMIT:  # keep the newest ids
                for old in sorted(index, key=lambda j: index[j][-1]["submitted_at"])[: len(index) - USER_INDEX_LIMIT]:
                    del index[old]
            box[0] = index
    except OSError as exc:  # the per-user index is a convenience; the job was submitted
        print(f"fljob: could not update {user_index_path()}: {exc}", file=sys.stderr)


def _indexed_log(job_id: str, sacct: dict[str, str]) -> Path | None:
    """The log recorded for this id; when ids repeat (another cluster), the entry sacct agrees with."""
    try:
        index = json.loads(user_index_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entries = index.get(job_id) if isinstance(index, dict) else None
    if not entries:
        return None
    conf = os.environ.get("SLURM_CONF")
    if sacct:
        matching = [e for e in entries if e.get("name") == sacct.get("JobName")
                    and (not sacct.get("WorkDir") or e.get("workdir") == sacct.get("WorkDir"))]
        entries = matching or entries
    same_cluster = [e for e in entries if e.get("slurm_conf") == conf]
    return Path((same_cluster or entries)[-1]["log"])


# --------------------------------------------------------------------------- submit


def submit(spec: JobSpec, task: Task = "train", dry_run: bool = False) -> Handle | None:
    files = slurm_render.render(spec, task)
    run_dir = Path(spec.resolved_run_dir).absolute()
    written = [f.write(run_dir) for f in files]
    script_path = run_dir / slurm_render.SCRIPT_FILE
    script = next(f for f in files if f.name == slurm_render.SCRIPT_FILE).content
    if dry_run:
        print("fljob submit --dry-run: nothing submitted. Rendered:")
        for path in written:
            print(f"  {path}")
        print(f"submit would run, in {Path.cwd()} (through submitit, from a byte-identical copy "
              f"of the script under {run_dir / SUBMITIT_DIR}/):")
        print(f"  sbatch {shlex.quote(str(script_path))}")
        return None

    _require("sbatch")
    _require("srun")  # submitit's SlurmExecutor insists on it
    put_this_fljob_on_path()  # the job inherits this environment
    submitit = _submitit()
    (run_dir / SUBMITIT_DIR).mkdir(parents=True, exist_ok=True)
    executor = _executor(run_dir / SUBMITIT_DIR, script, tasks=spec.resources.nodes)
    try:
        # submitit prints sbatch's stderr itself on failure; we report it once, in our words.
        with contextlib.redirect_stderr(io.StringIO()):
            job = executor._submit_command("fljob")  # the command is unused: the script is ours
    except submitit.core.utils.FailedJobError as exc:
        raise _slurm_error("sbatch", str(exc), f"sbatch did not accept {script_path}",
                           "Check the spec's resources and slurm fields against `sinfo`") from None
    except submitit.core.utils.FailedSubmissionError as exc:
        raise UsageError(f"sbatch gave no job id: {exc}") from None
    except FileNotFoundError as exc:
        raise UsageError(f"cannot run sbatch: {exc}") from None

    job_id = str(job.job_id)
    log = run_dir / slurm_render.LOG_PATTERN.replace("%j", job_id)
    _record({
        "job_id": job_id,
        "task": task,
        "name": spec.name,
        "run_dir": str(run_dir),
        "log": str(log),
        "script": str(script_path),
        "submitted_copy": str(job.paths.submission_file),
        "workdir": str(Path.cwd()),
        "slurm_conf": os.environ.get("SLURM_CONF"),
        "submitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    print(f"fljob: submitted {spec.name} as SLURM job {job_id}; log {log}", file=sys.stderr)
    return Handle("slurm", job_id)


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


def status(handle: Handle) -> str:
    job_id = _job_id(handle)
    sacct, live = _query(job_id)
    # scontrol is exact while slurmctld holds the job; sacct (submitit's watcher) after that.
    state = (live or {}).get("JobState") or _state_word(sacct.get("State", ""))
    exit_code = (live or {}).get("ExitCode") or sacct.get("ExitCode", "")
    parts = [f"{handle}", state]
    if state in TERMINAL_STATES and exit_code:
        code, _, sig = exit_code.partition(":")
        parts.append(f"exit_code={code}")
        if sig and sig != "0":
            parts.append(f"signal={sig}")
    if live and state not in TERMINAL_STATES and live.get("Reason") not in (None, "None"):
        parts.append(f"reason={live['Reason']}")
    if live and "Restarts" in live:
        parts.append(f"restarts={live['Restarts']}")
    elapsed = (live or {}).get("RunTime") or sacct.get("Elapsed")
    if elapsed:
        parts.append(f"elapsed={elapsed}")
    log = _log_path(job_id, sacct, live)
    if log:
        parts.append(f"log={log}")
    return " ".join(parts)


# --------------------------------------------------------------------------- logs


def _log_path(job_id: str, sacct: dict[str, str], live: dict[str, str] | None) -> Path | None:
    if live and live.get("StdOut"):
        return Path(live["StdOut"].replace("%j", job_id).replace("%x", live.get("JobName", "")))
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
            when = "ended" if state in TERMINAL_STATES else "is"
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
            done = state is None or state in TERMINAL_STATES
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
    if state in TERMINAL_STATES:
        raise UsageError(f"slurm://{job_id} already ended ({state}); there is nothing to cancel")
    _require("scancel")
    submitit = _submitit()
    folder = Path(sacct.get("WorkDir") or Path.cwd()) / SUBMITIT_DIR
    job = submitit.SlurmJob(folder=folder, job_id=job_id)
    try:
        job.cancel(check=True)  # scancel <id>: the batch script and every step get SIGTERM, then SIGKILL
    except subprocess.CalledProcessError as exc:
        raise UsageError(f"scancel {job_id} failed (exit {exc.returncode}); see its message above") from None
