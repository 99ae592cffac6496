"""The submitit internals fljob uses (fljob/backends/submitit_glue.py), pinned to the version
they were checked against: a new submitit fails here, not in a user's submission."""

from __future__ import annotations

import inspect

import pytest

submitit = pytest.importorskip("submitit")

from fljob.backends import submitit_glue


def test_installed_submitit_is_a_verified_version() -> None:
    assert submitit.__version__ in submitit_glue.VERIFIED_VERSIONS, (
        f"submitit {submitit.__version__} is not one fljob's adapter was checked against "
        f"({submitit_glue.VERIFIED_VERSIONS}): check the internals below, then add it")


def test_the_internals_the_adapter_overrides_or_calls_exist_with_their_signatures() -> None:
    from submitit.slurm.slurm import SlurmInfoWatcher

    executor = submitit.SlurmExecutor
    assert list(inspect.signature(executor._make_submission_file_text).parameters) == ["self", "command", "uid"]
    assert list(inspect.signature(executor._num_tasks).parameters) == ["self"]
    assert list(inspect.signature(executor._submit_command).parameters) == ["self", "command"]
    assert list(inspect.signature(SlurmInfoWatcher._make_command).parameters) == ["self"]
    assert "-o" in (SlurmInfoWatcher(delay_s=600)._make_command() or ["-o"])  # the field list follows -o
    assert callable(submitit.SlurmJob.cancel)


def test_the_sacct_command_asks_for_the_fields_status_reads() -> None:
    watcher = submitit_glue.sacct_watcher_class()(delay_s=600)
    watcher.register_job("1234")
    command = watcher._make_command()
    assert command[command.index("-o") + 1] == submitit_glue.SACCT_FIELDS
    assert {"State", "ExitCode", "Elapsed", "WorkDir"} <= set(submitit_glue.SACCT_FIELDS.split(","))
