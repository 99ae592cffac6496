"""The one place fljob uses submitit's internals; tests/test_submitit_glue.py pins them.

submitit's public API submits pickled Python callables; fljob submits a rendered batch
script, byte for byte what `fljob render` shows. No public entry point takes a script, so
three internals are used here and nowhere else, against the submitit versions in
``VERIFIED_VERSIONS`` (a test fails on any other installed version until it is checked):

- ``SlurmExecutor._make_submission_file_text`` returns the script (overridden),
- ``SlurmExecutor._num_tasks`` gives the task count submitit records (overridden),
- ``Executor._submit_command`` writes the file, runs sbatch and parses the job id,
- ``SlurmInfoWatcher._make_command`` builds the sacct command (overridden to ask for the
  exit code, elapsed time and working directory too).

Cancelling uses the public ``SlurmJob.cancel``.
"""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path
from typing import Any

from fljob.errors import UsageError

VERIFIED_VERSIONS = ("1.5.4",)
SACCT_FIELDS = "JobID,State,ExitCode,Elapsed,NodeList,JobName,WorkDir"


def _submitit() -> Any:
    import submitit  # only the commands that act need it

    return submitit


def submit_script(folder: Path, script: str, tasks: int) -> tuple[str, Path]:
    """sbatch ``script`` (kept as submitit's submission file under ``folder``): (job id, copy).

    sbatch's refusal raises UsageError with its words (the caller adds what to check).
    """
    submitit = _submitit()

    class RenderedScriptExecutor(submitit.SlurmExecutor):
        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return script

        def _num_tasks(self) -> int:
            return tasks

    folder.mkdir(parents=True, exist_ok=True)
    executor = RenderedScriptExecutor(folder=folder)
    try:
        # submitit prints sbatch's stderr itself on failure; the caller reports it once.
        with contextlib.redirect_stderr(io.StringIO()):
            job = executor._submit_command("fljob")  # the command is unused: the script is ours
    except submitit.core.utils.FailedJobError as exc:
        raise SbatchRefused(str(exc)) from None
    except submitit.core.utils.FailedSubmissionError as exc:
        raise UsageError(f"sbatch gave no job id: {exc}") from None
    except FileNotFoundError as exc:
        raise UsageError(f"cannot run sbatch: {exc}") from None
    return str(job.job_id), Path(job.paths.submission_file)


class SbatchRefused(UsageError):
    """sbatch rejected the script; the message is sbatch's."""


@functools.cache
def sacct_watcher_class() -> type:
    """submitit's SlurmInfoWatcher, asking sacct for SACCT_FIELDS."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SacctWatcher(SlurmInfoWatcher):
        def _make_command(self) -> list[str] | None:
            command = super()._make_command()
            if command is not None:
                command[command.index("-o") + 1] = SACCT_FIELDS
            return command

    return SacctWatcher


def sacct_info(job_id: str) -> dict[str, str]:
    """The job's accounting record ({} when sacct has none), through submitit's watcher."""
    return sacct_watcher_class()(delay_s=600).get_info(job_id, mode="force")


def cancel(job_id: str, folder: Path) -> None:
    """scancel <id>: the batch script and every step get SIGTERM, then SIGKILL."""
    _submitit().SlurmJob(folder=folder, job_id=job_id).cancel(check=True)
