"""`fljob launch`: torchrun, plus the two things the preemption contract needs from it.

1. The trainer's exit code survives. torchrun reports any failed worker as exit 1; when every
   failed worker exited with REQUEUE (checkpoint committed, "requeue me"), we exit REQUEUE so
   the batch script's trailer can requeue.
2. The pre-kill signal reaches the workers. torchrun does not handle SIGUSR2 (its default
   action would kill the agent and orphan the workers), and it starts each worker in its own
   session, so we forward SIGUSR2 (and SIGTERM, as Kubernetes sends it) to every worker's
   process group ourselves. The trainer treats both as "checkpoint now and exit REQUEUE".

Arguments are torchrun's; everything after `--` is the fljob subcommand each worker runs
(`fljob launch --nproc-per-node=2 -- train spec.yaml`).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from fljob.exitcodes import REQUEUE

FORWARDED_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, read from /proc (Linux: SLURM and Kubernetes nodes)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return out


def _forward(signum: int, _frame: object) -> None:
    for child in _descendants(os.getpid()):
        try:
            os.killpg(os.getpgid(child), signum)  # the worker and anything it started
        except (ProcessLookupError, PermissionError):
            pass


def torchrun_argv(argv: list[str]) -> list[str]:
    """torchrun's argv: its options, then `--no-python fljob <subcommand ...>`."""
    if "--" not in argv:
        raise SystemExit("fljob launch: expected torchrun options, then -- and the fljob subcommand "
                         "(e.g. fljob launch --nproc-per-node=2 -- train spec.yaml)")
    split = argv.index("--")
    return [*argv[:split], "--no-python", "fljob", *argv[split + 1 :]]


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # torchrun handles SIGTERM by killing the workers after 30 s; we want them to checkpoint.
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGINT,SIGHUP,SIGQUIT")
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _forward)
    try:
        torchrun(torchrun_argv(argv))
    except ChildFailedError as exc:
        codes = sorted({failure.exitcode for failure in exc.failures.values()})
        print(f"fljob launch: workers exited with {codes}", file=sys.stderr)
        if codes == [REQUEUE]:
            return REQUEUE
        return codes[0] if codes and codes[0] > 0 else 1
    return 0
