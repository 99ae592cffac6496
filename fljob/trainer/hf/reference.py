"""``fljob_reference.json``: what fljob's own model computes on a fixed text, to prove an
export equal.

The export writes, beside the weights, a fixed token sequence (:data:`REFERENCE_TEXT`
through the run's tokenizer, cut to the model's sequence length), fljob's float32 logits
at its first and last positions for a few dozen vocabulary entries each (evenly spread
over the vocabulary, plus the highest-scoring ones, which decide what a model generates),
and fljob's loss on it (mean next-token cross-entropy, as in training). Any float32 load
of the export must reproduce them within :data:`ATOL` + :data:`RTOL` x |value|; the export
checks its own output that way, and so can anyone with only ``transformers``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

REFERENCE_TEXT = ("Return a new sorted list from the items in iterable. The key function is "
                  "called once for each element, and the result is cached. A custom key "
                  "function can be used to sort values in descending order.")
MAX_TOKENS = 64
SPREAD_ENTRIES = 24
TOP_ENTRIES = 8
# float32 on CPU: folding reorders a few multiplications and HF's attention/RMSNorm code
# rounds differently from fljob's. tests/trainer/test_hf.py measures at most 1.7e-6 on the
# tiny flavor in every setting (logits of size ~1-10); deeper and wider models add rounding,
# the bound leaves a margin of 50x.
ATOL = 1e-4
RTOL = 1e-5


def reference_tokens(token_ids: list[int], max_seq_len: int) -> list[int]:
    """The encoded reference text, cut to the model's and the file's length limit."""
    tokens = token_ids[:min(MAX_TOKENS, max_seq_len)]
    if len(tokens) < 2:
        raise ValueError("the reference text encodes to fewer than 2 tokens")
    return tokens


def _entries(row: torch.Tensor) -> list[int]:
    vocab = row.shape[-1]
    spread = torch.linspace(0, vocab - 1, SPREAD_ENTRIES).round().long().tolist()
    top = row.topk(min(TOP_ENTRIES, vocab)).indices.tolist()
    return sorted(set(spread) | set(top))


def _logit_record(logits: torch.Tensor, position: int) -> dict[str, Any]:
    ids = _entries(logits[position])
    return {"position": position, "token_ids": ids, "values": logits[position, ids].tolist()}


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cross-entropy of every position's prediction of the next token."""
    return F.cross_entropy(logits[:-1].float(), tokens[1:]).item()


Forward = Callable[[torch.Tensor], torch.Tensor]
"""Token ids of shape (1, seq) -> logits of shape (1, seq, vocab)."""


@torch.no_grad()
def build_reference(forward: Forward, tokens: list[int]) -> dict[str, Any]:
    """The reference record of ``forward`` on ``tokens``."""
    ids = torch.tensor([tokens])
    logits = forward(ids)[0].float()
    return {
        "text": REFERENCE_TEXT,
        "tokens": tokens,
        "dtype": "float32",
        "logits": [_logit_record(logits, p) for p in (0, len(tokens) - 1)],
        "loss": next_token_loss(logits, ids[0]),
        "tolerance": {"atol": ATOL, "rtol": RTOL},
    }


@dataclass(frozen=True)
class Deviation:
    """How far a model is from a reference: the largest logit and the loss difference."""

    logits: float
    loss: float
    within_tolerance: bool


@torch.no_grad()
def deviation(reference: dict[str, Any], forward: Forward) -> Deviation:
    """``forward`` against ``reference``: within tolerance when every recorded logit is
    within ATOL + RTOL x |value| and the loss within ATOL."""
    ids = torch.tensor([reference["tokens"]])
    logits = forward(ids)[0].float()
    worst, within = 0.0, True
    for entry in reference["logits"]:
        want = torch.tensor(entry["values"])
        diff = (logits[entry["position"], entry["token_ids"]] - want).abs()
        worst = max(worst, diff.max().item())
        within = within and bool((diff <= ATOL + RTOL * want.abs()).all())
    loss = abs(next_token_loss(logits, ids[0]) - reference["loss"])
    return Deviation(worst, loss, within and loss <= ATOL)
