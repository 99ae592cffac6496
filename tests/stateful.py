"""A stand-in for the trainer's train state and dataloader in checkpoint tests (tests only)."""

from __future__ import annotations

from typing import Any


class Counter:
    """A Stateful position: what the trainer's train state and dataloader give a checkpoint."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]
