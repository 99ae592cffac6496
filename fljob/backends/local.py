"""The local backend: the same spec on this machine, no cluster (the embedded default).

`render` writes `run.sh` (what SLURM's batch script does, minus the scheduler: the same env
block and the same `fljob launch` under torchrun's standalone rendezvous) and the spec beside
it. `submit` runs that script in the foreground, echoing its output and appending it to
`<run_dir>/train.log`, and records the process in `<run_dir>/local.json` so that
`fljob status|logs|cancel local://<run_dir>` work from another terminal.

A sweep renders one such folder per trial under the sweep's run folder, plus `sweep.json`;
`submit` runs the trials `sweep.parallel` at a time, each in its own process group and on its
own share of the CPU cores (so parallel CPU trials do not fight over threads, and trials on one
GPU each keep a host core to launch kernels from), and prints a line as each trial starts and
ends. Trials that already completed (or diverged) with the same number of steps are skipped,
so submitting a stopped sweep again resumes it.

The processes fljob starts run in sessions of their own: Ctrl-C (SIGINT to the terminal's
process group) reaches only `fljob submit`, which turns it into the preemption contract's
SIGTERM for the job (checkpoint, exit 75) instead of torchrun's tracebacks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from fljob.backends.base import (
    GENERATED_BY,
    SPEC_FILE,
    TASK_ARGV,
    Handle,
    JobState,
    JobStatus,
    RenderedFile,
    Submission,
    SweepStatus,
    Task,
    check_job_or_sweep,
    put_this_fljob_on_path,
    run_progress,
)
from fljob.backends.shell import env_block, secret_problems
from fljob.doctor import local_checks as doctor_checks
from fljob.errors import JobFailed, UsageError, elide
from fljob.exitcodes import DIVERGED, REQUEUE
from fljob.processes import start_ticks
from fljob.spec import JobSpec, Problem, dump_spec, problem_at
from fljob.spec.sweep import SWEEP_INDEX_FILE, Trial, expand, sweep_index
from fljob.summary import read_summary

NAME = "local"
__all__ = ["NAME", "cancel", "check", "doctor_checks", "logs", "plan", "render", "status", "submit"]
SCRIPT_FILE = "run.sh"
LOG_FILE = "train.log"
STATE_FILE = "local.json"
POLL_S = 0.2
MAX_STATE_BYTES = 1 << 16
RUN_MARKER_ENV = "FLJOB_LOCAL_RUN"  # set on every process fljob starts: which run folder it serves


# --------------------------------------------------------------------------- checks and render


def job_problems(spec: JobSpec) -> list[Problem]:
    problems = secret_problems(spec, "the local backend")
    if spec.resources.nodes != 1:
        problems.append(problem_at(spec, "resources.nodes", "the local backend runs on one machine; set "
                                   f"resources.nodes to 1 (got {spec.resources.nodes})."))
    return problems


def check(spec: JobSpec) -> None:
    check_job_or_sweep(spec, job_problems)


def render_script(spec: JobSpec, task: Task = "train") -> str:
    launch = " ".join([
        "exec fljob launch --standalone --nnodes=1",
        f"--nproc-per-node={spec.resources.nproc_per_node}",
        "--", *TASK_ARGV[task], '"$FLJOB_SPEC"',
    ])
    run_id = '"${FLJOB_RUN_ID:-local-$(date -u +%Y%m%dT%H%M%SZ)}"'
    return "\n".join([
        "#!/bin/bash",
        f"# {GENERATED_BY}",
        "set -uo pipefail",
        "",
        env_block(spec, "local", run_id=run_id),
        "",
        launch,
        "",
    ])


def _job_files(spec: JobSpec, task: Task, prefix: str = "") -> list[RenderedFile]:
    return [RenderedFile(prefix + SCRIPT_FILE, render_script(spec, task), executable=True),
            RenderedFile(prefix + SPEC_FILE, dump_spec(spec))]


def render(spec: JobSpec, task: Task = "train") -> list[RenderedFile]:
    """run.sh and spec.yaml; for a sweep, sweep.json and both files in each trial's folder."""
    check(spec)
    if spec.sweep is None:
        return _job_files(spec, task)
    trials = expand(spec)
    files = [RenderedFile(SWEEP_INDEX_FILE, json.dumps(sweep_index(spec, trials), indent=1) + "\n")]
    for trial in trials:
        files += _job_files(trial.spec, task, prefix=f"{trial.name}/")
    return files


def plan(spec: JobSpec, task: Task = "train") -> Submission:
    folder = Path(spec.resolved_run_dir).resolve()
    files = tuple(render(spec, task))
    if spec.sweep is None:
        return Submission(NAME, folder, files, f"bash {folder / SCRIPT_FILE}", spec, task, Handle(NAME, str(folder)))
    trials = tuple(expand(spec))
    command = (f"bash <trial>/{SCRIPT_FILE} for each of the {len(trials)} trials, "
               f"{min(spec.sweep.parallel, len(trials))} at a time")
    return Submission(NAME, folder, files, command, spec, task, Handle(NAME, str(folder)), trials)


# --------------------------------------------------------------------------- processes and state


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def _update_state(folder: Path, **changes: Any) -> None:
    """Merge ``changes`` into the state file (keeping a `cancelled` mark another process set)."""
    _write_state(folder / STATE_FILE, {**(_read_state(folder) or {}), **changes})


def _read_state(folder: Path) -> dict[str, Any] | None:
    """A run folder's local.json, checked field by field; None when there is none. A file
    that is not fljob's (tampered, truncated, too long) is a UsageError, never a traceback."""
    path = folder / STATE_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise UsageError(f"cannot read {elide(path)}: {exc.strerror}") from None
    try:
        state = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_STATE_BYTES else None
    except (UnicodeDecodeError, ValueError):
        state = None
    valid = (isinstance(state, dict) and type(state.get("pid")) is int and state["pid"] > 0
             and (state.get("exit_code") is None or type(state["exit_code"]) is int)
             and (state.get("start_ticks") is None or type(state["start_ticks"]) is int))
    if not valid:
        raise UsageError(f"{elide(path)} is not a state file fljob wrote (damaged or edited); fljob will not "
                         "act on it. Check the run folder; remove the file to forget the run")
    return state


def _alive(state: dict[str, Any], folder: Path) -> bool:
    """The recorded process still runs and is the one fljob started for this folder: same pid,
    same start time, and (a job) the marker variable fljob gave it or (a sweep's runner) an
    fljob command line. A tampered state file can name no other process."""
    pid = state["pid"]
    ticks = start_ticks(pid)
    if ticks is None or ticks != state.get("start_ticks"):
        return False
    try:
        if state.get("sweep"):
            return b"fljob" in Path(f"/proc/{pid}/cmdline").read_bytes()
        return f"{RUN_MARKER_ENV}={folder}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _state_or_error(handle: Handle) -> tuple[Path, dict[str, Any]]:
    try:
        folder = Path(handle.ident).resolve()
    except (OSError, ValueError) as exc:
        raise UsageError(f"{elide(handle)}: not a usable path ({exc})") from None
    state = _read_state(folder)
    if state is None:
        raise UsageError(f"{elide(handle)}: no local run there ({elide(folder / STATE_FILE)} is missing); "
                         "check the run folder")
    return folder, state


class _Run:
    """One started process (a job's run.sh, or a sweep's trial) and its state file."""

    def __init__(self, argv: list[str], folder: Path, *, echo: bool, cpus: set[int] | None = None) -> None:
        self.folder = folder
        self.started = time.time()
        self.log = open(folder / LOG_FILE, "ab")  # noqa: SIM115  (closed in finish())
        # A session of its own: the terminal's Ctrl-C reaches fljob, which forwards SIGTERM.
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE if echo else self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, RUN_MARKER_ENV: str(folder)})
        if cpus:  # before the script starts its workers (seconds later), which inherit it
            os.sched_setaffinity(self.proc.pid, cpus)
        self.state = {"pid": self.proc.pid, "start_ticks": start_ticks(self.proc.pid),
                      "started": self.started, "exit_code": None}
        _write_state(folder / STATE_FILE, self.state)

    def terminate(self) -> None:
        """The preemption contract: SIGTERM to the whole process group (checkpoint, exit 75)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def echo_until_exit(self) -> int:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            self.log.write(line)
            self.log.flush()
        return self.finish(self.proc.wait())

    def finish(self, rc: int) -> int:
        self.log.close()
        _update_state(self.folder, exit_code=rc)
        return rc


class _Interrupted:
    """While active, SIGINT/SIGTERM run `on_signal` (once each time) instead of killing fljob."""

    def __init__(self, on_signal: Any) -> None:
        self.on_signal = on_signal
        self.received = False

    def __enter__(self) -> Self:
        def handler(_signum: int, _frame: Any) -> None:
            self.received = True
            self.on_signal()

        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- submit


def _describe_outputs(spec: JobSpec, run_dir: Path) -> str:
    ckpt = spec.checkpoint.uri or str(run_dir / "checkpoints")
    lines = [f"fljob: run folder {run_dir}",
             f"fljob:   log          {run_dir / LOG_FILE}",
             f"fljob:   metrics      {run_dir / 'metrics.jsonl'}"]
    if spec.metrics.enabled:
        lines.append(f"fljob:   prometheus   http://127.0.0.1:{spec.metrics.port}/metrics (while it runs)")
    lines.append(f"fljob:   checkpoints  {ckpt}")
    return "\n".join(lines)


def submit(plan: Submission) -> Handle:
    """Run the job (or every trial) here, in the foreground; JobFailed carries the exit code."""
    assert plan.handle is not None
    _refuse_if_running(plan.folder)
    plan.write()
    put_this_fljob_on_path()
    if plan.spec.sweep is not None:
        return _run_sweep(plan)
    print(_describe_outputs(plan.spec, plan.folder), flush=True)
    run = _Run(["bash", str(plan.folder / SCRIPT_FILE)], plan.folder, echo=True)
    with _Interrupted(run.terminate):
        rc = run.echo_until_exit()
    _raise_for(rc, plan.handle, plan.folder)
    return plan.handle


def _refuse_if_running(folder: Path) -> None:
    try:
        state = _read_state(folder)
    except UsageError:
        return  # a damaged state file is overwritten by the new run
    if state is not None and state["exit_code"] is None and _alive(state, folder):
        raise UsageError(f"{folder} is in use by a running fljob process (pid {state['pid']}); wait for it, "
                         f"cancel it (fljob cancel local://{folder}), or use another run_dir")


def _raise_for(rc: int, handle: Handle, folder: Path) -> None:
    if rc == REQUEUE:
        raise JobFailed(rc, f"{handle}: stopped by a signal after checkpointing; submit again to resume")
    if rc == DIVERGED:
        raise JobFailed(rc, f"{handle}: stopped because the loss or the gradient norm became NaN/inf (nothing "
                            f"of it was committed); see {folder / LOG_FILE}")
    if rc != 0:
        raise JobFailed(rc, f"{handle}: failed with exit code {rc}; see {folder / LOG_FILE}")


def _finished(trial: Trial) -> bool:
    """The trial already ran to its planned steps (or diverged): a resubmitted sweep skips it."""
    try:
        summary = read_summary(trial.run_dir)
    except (OSError, ValueError):
        return False
    return summary is not None and summary.steps == trial.spec.training.steps and (
        summary.state == "diverged" or summary.state == "completed" and summary.step >= summary.steps)


def cpu_slots(parallel: int, cpus: list[int] | None = None) -> list[set[int]]:
    """Split this process's cores into ``parallel`` disjoint sets (shared round-robin when
    there are fewer cores than slots)."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    if parallel >= len(cpus):
        return [{cpus[i % len(cpus)]} for i in range(parallel)]
    share, extra = divmod(len(cpus), parallel)
    slots, start = [], 0
    for i in range(parallel):
        size = share + (i < extra)
        slots.append(set(cpus[start:start + size]))
        start += size
    return slots


def _run_sweep(plan: Submission) -> Handle:
    assert plan.spec.sweep is not None and plan.handle is not None
    trials = list(plan.trials)
    todo = [t for t in trials if not _finished(t)]
    parallel = min(plan.spec.sweep.parallel, max(len(todo), 1))
    print(f"fljob: sweep {plan.spec.name}: {len(trials)} trials ({len(trials) - len(todo)} already done), "
          f"{parallel} at a time, in {plan.folder}", flush=True)
    sweep_state = {"pid": os.getpid(), "start_ticks": start_ticks(os.getpid()), "started": time.time(),
                   "exit_code": None, "sweep": True}
    _write_state(plan.folder / STATE_FILE, sweep_state)
    free = cpu_slots(parallel)
    running: dict[int, tuple[Trial, _Run, set[int]]] = {}
    outcomes: dict[str, int] = {}

    def stop_all() -> None:
        for _, run, _ in running.values():
            run.terminate()

    with _Interrupted(stop_all) as interrupted:
        while todo or running:
            while todo and free and not interrupted.received:
                trial, cpus = todo.pop(0), free.pop(0)
                run = _Run(["bash", str(Path(trial.run_dir).resolve() / SCRIPT_FILE)],
                           Path(trial.run_dir).resolve(), echo=False, cpus=cpus)
                running[run.proc.pid] = (trial, run, cpus)
                print(f"fljob: trial {trial.index} {trial.name} started "
                      f"({', '.join(f'{k}={v}' for k, v in trial.overrides.items())})", flush=True)
            if not running:
                break
            pid, rc = _wait_any()
            if pid not in running:
                continue
            trial, run, cpus = running.pop(pid)
            free.append(cpus)
            outcomes[trial.name] = run.finish(rc)
            print(_trial_line(trial, rc, time.time() - run.started), flush=True)
    interrupted_rc = REQUEUE if interrupted.received else None
    rc = interrupted_rc or _sweep_exit_code(outcomes.values())
    _update_state(plan.folder, exit_code=rc)
    print(f"fljob: sweep {plan.spec.name}: {_count_words(outcomes.values())}; "
          f"fljob status {plan.handle} ; fljob sweep report {plan.folder} -o <folder>", flush=True)
    if rc == REQUEUE:
        raise JobFailed(rc, f"{plan.handle}: stopped by a signal; running trials checkpointed. Submit again "
                            "to resume (finished trials are skipped)")
    if rc != 0:
        raise JobFailed(rc, f"{plan.handle}: some trials failed; see their train.log (fljob status {plan.handle})")
    return plan.handle


def _wait_any() -> tuple[int, int]:
    """(pid, exit code as the shell reports it) of the next child that ends."""
    pid, status = os.wait()
    code = os.waitstatus_to_exitcode(status)
    return pid, code if code >= 0 else 128 - code


def _sweep_exit_code(codes: Any) -> int:
    """0 when every trial ran (completed or diverged: both are results); else the first failure."""
    failed = [c for c in codes if c not in (0, DIVERGED)]
    return failed[0] if failed else 0


def _count_words(codes: Any) -> str:
    states = [_state_for(c, cancelled=False).value for c in codes]
    return ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)) or "nothing ran"


def _trial_line(trial: Trial, rc: int, seconds: float) -> str:
    progress = run_progress(Path(trial.run_dir))
    losses = "".join(f", {label} {value:.4f}" for label, value in
                     (("loss", progress.loss), ("validation loss", progress.validation_loss)) if value is not None)
    return f"fljob: trial {trial.index} {trial.name} {_state_for(rc, cancelled=False).value} in {seconds:.1f} s{losses}"


# --------------------------------------------------------------------------- status, logs, cancel


def _state_for(rc: int | None, *, cancelled: bool, alive: bool = False) -> JobState:
    if rc is None:
        return JobState.RUNNING if alive else JobState.UNKNOWN
    if rc == 0:
        return JobState.COMPLETED
    if rc == REQUEUE:
        return JobState.PREEMPTED
    if rc == DIVERGED:
        return JobState.DIVERGED
    return JobState.CANCELLED if cancelled else JobState.FAILED


def _job_status(handle: str, folder: Path, state: dict[str, Any] | None, *, name: str | None = None,
                waiting: bool = False) -> JobStatus:
    progress = run_progress(folder)
    if state is None:
        word = JobState.PENDING if waiting else JobState.UNKNOWN
        return JobStatus(handle, word, native="not started", name=name)
    alive = state["exit_code"] is None and _alive(state, folder)
    job_state = _state_for(state["exit_code"], cancelled=bool(state.get("cancelled")), alive=alive)
    lost = state["exit_code"] is None and not alive
    return JobStatus(handle, job_state, native="process gone without an exit code" if lost else "",
                     exit_code=state["exit_code"], step=progress.step, steps=progress.steps, loss=progress.loss,
                     validation_loss=progress.validation_loss, logs=str(folder / LOG_FILE),
                     details=(("pid", str(state["pid"])),) if alive or lost else (), name=name)


def status(handle: Handle) -> JobStatus | SweepStatus:
    folder, state = _state_or_error(handle)
    index = _sweep_index(folder)
    if index is None:
        return _job_status(str(handle), folder, state)
    sweeping = state["exit_code"] is None and _alive(state, folder)
    trials = []
    for trial in index["trials"]:
        trial_dir = folder / trial["name"]
        trials.append(_job_status(f"local://{trial_dir}", trial_dir, _read_state(trial_dir),
                                  name=trial["name"], waiting=sweeping))
    return SweepStatus(str(handle), index["sweep"], tuple(trials))


def _sweep_index(folder: Path) -> dict[str, Any] | None:
    path = folder / SWEEP_INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a sweep index fljob wrote ({exc}); fljob will not act on it") from None
    trials = index.get("trials") if isinstance(index, dict) else None
    if not isinstance(trials, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and "/" not in t["name"] for t in trials):
        raise UsageError(f"{path} is not a sweep index fljob wrote; fljob will not act on it")
    return index


def logs(handle: Handle, follow: bool = False) -> Iterator[str]:
    folder, _ = _state_or_error(handle)
    if _sweep_index(folder) is not None:
        raise UsageError(f"{handle} is a sweep: show a trial's log with fljob logs local://{folder}/<trial name> "
                         f"(fljob status {handle} lists them)")
    path = folder / LOG_FILE
    if not path.exists():
        raise UsageError(f"{handle}: no log yet at {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            state = _read_state(folder)
            done = not follow or state is None or state["exit_code"] is not None or not _alive(state, folder)
            chunk = f.read()  # read after the check: nothing written before the exit is missed
            if chunk:
                yield chunk
            elif done:
                return
            else:
                time.sleep(0.5)


def cancel(handle: Handle) -> None:
    """SIGTERM to the run's process group (the trainer checkpoints, exit 75); for a sweep, to the
    runner, which stops starting trials and forwards it to the running ones. Only ever to the
    process fljob started (pid and start time recorded)."""
    folder, state = _state_or_error(handle)
    if state["exit_code"] is not None or not _alive(state, folder):
        raise UsageError(f"{handle} is not running (or its state file names no process fljob started)")
    _update_state(folder, cancelled=True)
    pid = state["pid"]
    if state.get("sweep"):
        os.kill(pid, signal.SIGTERM)
    else:
        os.killpg(pid, signal.SIGTERM)
