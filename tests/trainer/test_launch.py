"""`fljob launch`: the exit code it derives from torchrun's failed workers."""

from __future__ import annotations

import signal

import pytest

from fljob.exitcodes import DIVERGED, REQUEUE
from fljob.trainer.launch import launcher_exit_code, torchrun_argv


@pytest.mark.parametrize(("codes", "expected"), [
    ([REQUEUE], REQUEUE),
    # Rank 1 exited REQUEUE first; torchrun then tore rank 0 down (SIGTERM, or SIGKILL).
    ([-signal.SIGTERM, REQUEUE], REQUEUE),
    ([-signal.SIGKILL, REQUEUE], REQUEUE),
    ([1, REQUEUE], 1),  # a real failure beside the requeue wins
    ([-signal.SIGSEGV, REQUEUE], 1),  # a crash is not a teardown
    ([-signal.SIGTERM], 1),  # killed, nobody checkpointed
    ([2], 2),
    # Every rank stopped on a non-finite loss; torchrun tore down the slower ones.
    ([DIVERGED, DIVERGED], DIVERGED),
    ([-signal.SIGTERM, DIVERGED], DIVERGED),
    ([DIVERGED, REQUEUE], DIVERGED),  # not agreed: the first code, as for any mix
    ([-signal.SIGSEGV, DIVERGED], 1),
])
def test_exit_code_from_failed_workers(codes: list[int], expected: int) -> None:
    assert launcher_exit_code(sorted(codes)) == expected


def test_torchrun_argv_runs_fljob_without_python() -> None:
    assert torchrun_argv(["--nproc-per-node=2", "--", "train", "s.yaml"]) == [
        "--nproc-per-node=2", "--no-python", "fljob", "train", "s.yaml"]
    with pytest.raises(SystemExit):
        torchrun_argv(["train", "s.yaml"])
