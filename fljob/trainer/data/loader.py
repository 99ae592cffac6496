"""A stateful, data-parallel, resumable loader of fixed-length windows from a token file.

The token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (input and
shifted labels). Each epoch visits them in a seeded random order; every step takes the next
``dp_world * batch_size`` windows of that order, and rank ``r`` gets the ``r``-th block of
``batch_size``. All ranks advance in lockstep, so the whole position is two numbers that
are the same on every rank (epoch, windows consumed in it): identical copies in a
checkpoint lose nothing, and a run may resume with another data-parallel size or batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torchtitan.components.dataloader import BaseDataLoader


class TokenWindowLoader(BaseDataLoader):
    """Infinite: yields ``({"input": ids[B, L]}, labels[B, L])`` as int64 CPU tensors."""

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, dp_rank: int,
                 dp_world: int, seed: int) -> None:
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} outside a data-parallel world of {dp_world}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.dp_rank, self.dp_world, self.seed = dp_rank, dp_world, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < self.step_windows:
            raise ValueError(
                f"{len(tokens)} tokens make {self.num_windows} windows of {seq_len + 1}, fewer "
                f"than one step needs ({dp_world} ranks x batch {batch_size}); use more data, a "
                "shorter seq_len or a smaller batch")
        self.epoch = 0
        self.consumed = 0  # windows of this epoch's order taken by all ranks together

    @property
    def step_windows(self) -> int:
        return self.dp_world * self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets from one epoch before any window repeats."""
        return self.num_windows // self.step_windows

    def order(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch``: the same permutation on every rank."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        order = self.order(self.epoch)
        while True:
            if self.consumed + self.step_windows > self.num_windows:  # drop the ragged tail
                self.epoch, self.consumed = self.epoch + 1, 0
                order = self.order(self.epoch)
            start = self.consumed + self.dp_rank * self.batch_size
            windows = order[start:start + self.batch_size]
            self.consumed += self.step_windows  # before yielding: state = batches handed out
            batch = np.stack([self._window(w) for w in windows]).astype(np.int64)
            tokens = torch.from_numpy(batch)
            yield {"input": tokens[:, :-1]}, tokens[:, 1:]

    def _window(self, index: int) -> np.ndarray:
        begin = int(index) * self.seq_len
        return self.tokens[begin:begin + self.seq_len + 1]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved position; takes effect at the next ``iter()``."""
        if state_dict:
            self.epoch, self.consumed = int(state_dict["epoch"]), int(state_dict["consumed"])
