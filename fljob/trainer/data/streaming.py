"""The streaming dataloader: MDS token samples from object storage, by data-parallel rank.

A mosaicml-streaming ``StreamingDataset`` over the spec's streams (with their proportions)
reads samples of ``seq_len + 1`` tokens written by ``fljob data prepare`` and yields
torchtitan batches ``({"input": x[:, :-1]}, x[:, 1:])``.

Sharding follows the data-parallel rank, not the global one. Streaming partitions samples by
the ``RANK``/``WORLD_SIZE`` that torchrun sets; the tensor-parallel peers of one
data-parallel rank are consecutive global ranks in torchtitan's mesh (``[dp_replicate,
dp_shard, tp]``, TP innermost), so ``replication = world / dp_world`` makes streaming give
them identical samples and makes its partition index equal torchtitan's ``dp_rank``. The
loader checks that equality instead of assuming it.

The position is streaming's own global state (epoch, samples consumed by all data-parallel
ranks, shuffle seed, canonical nodes): the same on every rank, saved once in the checkpoint
and restored before the first batch, so a resumed run continues at the exact next sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchtitan.components.dataloader import BaseDataLoader

from fljob.trainer.data.mds_prepare import TOKENS_COLUMN
from fljob.trainer.data.shared_memory import registration_lock
from fljob.trainer.data.streaming_compat import import_streaming


@dataclass(frozen=True)
class StreamSource:
    """One MDS dataset: where it is, where its shards are cached, its share of samples."""

    uri: str
    cache_dir: str
    proportion: float | None = None


def stack_tokens(samples: list[dict[str, np.ndarray]]) -> torch.Tensor:
    """Collate: ``[batch, seq_len + 1]`` int64 token ids."""
    return torch.from_numpy(np.stack([s[TOKENS_COLUMN] for s in samples]).astype(np.int64))


def replication_for(dp_rank: int, dp_world: int) -> int:
    """How many consecutive global ranks share one data-parallel rank's samples.

    Raises when streaming's partition (global rank // replication) would not be ``dp_rank``.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world % dp_world or rank // (world // dp_world) != dp_rank:
        raise RuntimeError(
            f"global rank {rank} of {world} is data-parallel rank {dp_rank} of {dp_world}, "
            "which is not rank // (world / dp_world): the streaming loader needs the "
            "non-data-parallel ranks (TP) innermost in the device mesh")
    return world // dp_world


class StreamingTokenLoader(BaseDataLoader):
    """Infinite: every epoch of the streams in a seeded shuffled order, batch after batch."""

    def __init__(self, sources: Sequence[StreamSource], *, batch_size: int, dp_rank: int,
                 dp_world: int, seed: int, predownload: int | None = None,
                 cache_limit: str | None = None, num_workers: int = 0) -> None:
        streaming = import_streaming()
        replication = replication_for(dp_rank, dp_world)
        streams = [streaming.Stream(remote=s.uri, local=s.cache_dir, proportion=s.proportion)
                   for s in sources]
        with registration_lock():  # one job at a time picks a shared-memory prefix
            self.dataset = streaming.StreamingDataset(
                streams=streams, batch_size=batch_size, shuffle=True, shuffle_seed=seed,
                predownload=predownload, cache_limit=cache_limit,
                replication=replication if replication > 1 else None)
        self.loader = streaming.StreamingDataLoader(
            self.dataset, batch_size=batch_size, collate_fn=stack_tokens, drop_last=True,
            num_workers=num_workers, persistent_workers=num_workers > 0)
        self.step_samples = batch_size * dp_world
        if self.dataset.epoch_size < self.step_samples:
            raise ValueError(
                f"the streams hold {self.dataset.epoch_size} samples per epoch, fewer than one "
                f"step needs ({dp_world} data-parallel ranks x batch {batch_size}); prepare "
                "more data or use a smaller batch")

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets from one epoch before streaming pads it with repeats."""
        return self.dataset.epoch_size // self.step_samples

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:  # one pass of the inner loader is one epoch
            for tokens in self.loader:
                yield {"input": tokens[:, :-1]}, tokens[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """Streaming's global position: samples consumed by all data-parallel ranks."""
        return self.loader.state_dict() or {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved position; must come before the first batch is drawn."""
        if state_dict:
            self.loader.load_state_dict(state_dict)


def stream_cache_root(run_dir: str, local_cache: str | None, run_id: str) -> Path:
    """Where shards are cached: ``local_cache/<run id>`` (unique per job), else in run_dir.

    Streaming refuses two live datasets on one node with overlapping cache folders, so a
    cache folder shared by jobs (``data.local_cache`` on node-local disk) gets a per-job
    subfolder; ``run_dir`` is the job's own already.
    """
    if local_cache:
        return Path(local_cache) / run_id
    return Path(run_dir) / "data" / "mds-cache"
