"""`fljob launch`: torchrun, plus the two things the preemption contract needs from it.

1. The trainer's exit code survives. torchrun reports any failed worker as exit 1; when every
   failed worker exited with REQUEUE (checkpoint committed, "requeue me"), we exit REQUEUE so
   the batch script's trailer can requeue, and likewise DIVERGED (the loss became NaN/inf),
   so that a sweep can tell a diverged trial from a crashed one.
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

from fljob.exitcodes import DIVERGED, REQUEUE

FORWARDED_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# How torchrun's own teardown of the remaining workers shows up in their exit codes.
TEARDOWN_EXIT_CODES = frozenset({-signal.SIGTERM, -signal.SIGKILL})
# Codes every rank exits with together, after deciding together (a collective) to stop.
AGREED_EXIT_CODES = (REQUEUE, DIVERGED)


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

    # torchrun handles SIGTERM by killing the workers; we want them to checkpoint. Its
    # --signals-to-handle option defaults from PET_SIGNALS_TO_HANDLE and overwrites
    # TORCHELASTIC_SIGNALS_TO_HANDLE, so the option's variable is the one to set.
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGINT,SIGHUP,SIGQUIT")
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _forward)
    try:
        torchrun(torchrun_argv(argv))
    except ChildFailedError as exc:
        codes = sorted({failure.exitcode for failure in exc.failures.values()})
        print(f"fljob launch: workers exited with {codes}", file=sys.stderr)
        return launcher_exit_code(codes)
    return 0


def launcher_exit_code(codes: list[int]) -> int:
    """The launcher's exit code from the sorted exit codes of the workers that failed.

    torchrun stops the other workers (SIGTERM, then SIGKILL) as soon as one exits non-zero.
    After a preemption every rank exits REQUEUE, but only once the checkpoint's commit has
    been broadcast; the slower ones (rank 0 still tearing down) then show up as killed by
    that teardown. A mix of REQUEUE and such kills is therefore still a requeue; the same
    holds for DIVERGED, which every rank also exits with at the same step.
    """
    for agreed in AGREED_EXIT_CODES:
        if agreed in codes and set(codes) <= {agreed, *TEARDOWN_EXIT_CODES}:
            return agreed
    return codes[0] if codes and codes[0] > 0 else 1
