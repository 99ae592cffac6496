"""Object-store checkpointing with a commit protocol (see :mod:`.store` for the layout).

:func:`build_checkpointer` is the one entry: :class:`fljob.trainer.trainer.FljobTrainer`
calls it to replace torchtitan's local-folder ``CheckpointManager`` with fljob's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from fljob.spec.models import JobSpec
from fljob.trainer.checkpoint.compat import compatibility_record
from fljob.trainer.checkpoint.manager import FljobCheckpointManager
from fljob.trainer.checkpoint.store import (
    CheckpointError,
    CheckpointStore,
    normalize_uri,
    storage_options,
)
from fljob.trainer.job_config import job_spec

if TYPE_CHECKING:
    from torchtitan.train import Trainer

__all__ = ["CheckpointError", "CheckpointStore", "FljobCheckpointManager", "build_checkpointer",
           "open_store"]


def open_store(uri: str, spec: JobSpec) -> CheckpointStore:
    """The checkpoint location ``uri`` with the spec's storage settings (paths are taken
    relative to the run folder)."""
    uri = normalize_uri(uri, spec.resolved_run_dir)
    return CheckpointStore(uri, storage_options(uri, spec.storage, os.environ))


def build_checkpointer(trainer: Trainer) -> FljobCheckpointManager:
    """fljob's checkpointer over ``trainer``'s states, configured by the job config's
    checkpoint section (made from ``spec.checkpoint`` by :func:`build_job_config`). Rank 0
    holds the checkpoint location's lock from here until the checkpointer closes."""
    config = trainer.job_config.checkpoint
    spec = job_spec(trainer.job_config)
    store = open_store(config.folder, spec)
    return FljobCheckpointManager(
        store=store,
        spec=spec,
        checkpoint_config=dataclasses.replace(config, enable=True, folder=store.uri),
        keep_latest=spec.checkpoint.keep_latest,
        resume=spec.checkpoint.resume,
        compatibility=compatibility_record(spec, trainer.model_args),
        dataloader=trainer.dataloader,
        model_parts=trainer.model_parts,
        optimizers=trainer.optimizers,
        lr_schedulers=trainer.lr_schedulers,
        states={"train_state": trainer},
    )
