"""The local backend: the same spec on this machine, no cluster (the embedded default).

`render` writes `run.sh` (what SLURM's batch script does, minus the scheduler: the same env
block and the same `fljob launch` under torchrun's standalone rendezvous) and the spec beside
it. `submit` runs that script in the foreground, echoing its output and appending it to
`<run_dir>/train.log`, and records the process in `<run_dir>/local.json` so that
`fljob status|logs|cancel local://<run_dir>` work from another terminal.
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

from fljob.backends.base import (
    GENERATED_BY,
    SPEC_FILE,
    TASK_ARGV,
    Handle,
    RenderedFile,
    Task,
    put_this_fljob_on_path,
)
from fljob.backends.shell import env_block, secret_problems
from fljob.errors import JobFailed, UsageError
from fljob.exitcodes import REQUEUE
from fljob.spec import JobSpec, SpecError, dump_spec, problem_at

SCRIPT_FILE = "run.sh"
LOG_FILE = "train.log"
STATE_FILE = "local.json"


def check(spec: JobSpec) -> None:
    problems = secret_problems(spec, "the local backend")
    if spec.resources.nodes != 1:
        problems.append(problem_at(spec, "resources.nodes",
                                f"the local backend runs on one machine; set resources.nodes to 1 (got {spec.resources.nodes})."))
    if problems:
        raise SpecError(spec.origin(), problems)


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


def render(spec: JobSpec, task: Task = "train") -> list[RenderedFile]:
    check(spec)
    return [RenderedFile(SCRIPT_FILE, render_script(spec, task), executable=True),
            RenderedFile(SPEC_FILE, dump_spec(spec))]


# --------------------------------------------------------------------------- running


def _describe_outputs(spec: JobSpec, run_dir: Path) -> str:
    ckpt = spec.checkpoint.uri or str(run_dir / "checkpoints")
    lines = [f"fljob: run folder {run_dir}",
             f"fljob:   log          {run_dir / LOG_FILE}",
             f"fljob:   metrics      {run_dir / 'metrics.jsonl'}"]
    if spec.metrics.enabled:
        lines.append(f"fljob:   prometheus   http://127.0.0.1:{spec.metrics.port}/metrics (while it runs)")
    lines.append(f"fljob:   checkpoints  {ckpt}")
    return "\n".join(lines)


def submit(spec: JobSpec, task: Task = "train", dry_run: bool = False) -> Handle | None:
    """Run the job here, in the foreground; raises JobFailed with the job's exit code."""
    run_dir = Path(spec.resolved_run_dir).resolve()
    files = render(spec, task)
    if dry_run:
        print(f"would write {', '.join(f.name for f in files)} into {run_dir} and run: bash {run_dir / SCRIPT_FILE}")
        return None
    for f in files:
        f.write(run_dir)
    handle = Handle("local", str(run_dir))
    put_this_fljob_on_path()
    print(_describe_outputs(spec, run_dir), flush=True)
    rc = _run_logged(["bash", str(run_dir / SCRIPT_FILE)], run_dir)
    if rc == REQUEUE:
        raise JobFailed(rc, f"{handle}: stopped by a signal after checkpointing; submit again to resume")
    if rc != 0:
        raise JobFailed(rc, f"{handle}: failed with exit code {rc}; see {run_dir / LOG_FILE}")
    return handle


def _run_logged(argv: list[str], run_dir: Path) -> int:
    """Run argv, echo and append its output to the log, record pid and exit code for status."""
    state = run_dir / STATE_FILE
    with open(run_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _write_state(state, {"pid": proc.pid, "started": time.time(), "exit_code": None})
        # Ctrl-C / SIGTERM here become the launcher's "checkpoint and stop".
        previous = {s: signal.signal(s, lambda n, _f: proc.send_signal(signal.SIGTERM))
                    for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()
            rc = proc.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    _write_state(state, {"pid": proc.pid, "started": json.loads(state.read_text())["started"], "exit_code": rc})
    return rc


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def _state(handle: Handle) -> dict:
    path = Path(handle.ident) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{handle}: no local run there ({path} is missing); check the run folder") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(handle: Handle) -> str:
    state = _state(handle)
    rc = state["exit_code"]
    if rc is None:
        return f"{handle} RUNNING (pid {state['pid']})" if _alive(state["pid"]) else f"{handle} LOST (pid {state['pid']} is gone)"
    if rc == 0:
        return f"{handle} COMPLETED"
    if rc == REQUEUE:
        return f"{handle} PREEMPTED (checkpointed; submit again to resume)"
    return f"{handle} FAILED (exit code {rc})"


def logs(handle: Handle, follow: bool = False) -> Iterator[str]:
    path = Path(handle.ident) / LOG_FILE
    if not path.exists():
        raise UsageError(f"{handle}: no log yet at {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            done = not follow or _state(handle)["exit_code"] is not None
            chunk = f.read()  # read after the check: nothing written before the exit is missed
            if chunk:
                yield chunk
            elif done:
                return
            else:
                time.sleep(0.5)


def cancel(handle: Handle) -> None:
    state = _state(handle)
    if state["exit_code"] is not None or not _alive(state["pid"]):
        raise UsageError(f"{handle} is not running")
    os.kill(state["pid"], signal.SIGTERM)
