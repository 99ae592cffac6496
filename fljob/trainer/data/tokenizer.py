"""Tokenizers: a small byte-level BPE trained on the run's corpus, or a given tokenizer.json.

Both are used through :class:`TokenizerFile`, torchtitan's ``BaseTokenizer`` over a
Hugging Face ``tokenizers`` file. Byte-level BPE never meets an unknown character, and
training one on a few hundred KB takes well under a second, so a job without a
tokenizer still trains on real subword tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torchtitan.components.tokenizer import BaseTokenizer

EOS_TOKEN = "<|endoftext|>"
"""End-of-text token of the trained BPE; it separates documents in the token stream."""

KNOWN_EOS_TOKENS = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
"""End-of-text spellings looked up in a given tokenizer, in this order."""


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with exactly ``vocab_size`` ids (EOS included) when the text allows.

    Deterministic: the same texts and size give the same tokenizer, byte for byte.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


class TokenizerFile(BaseTokenizer):
    """A ``tokenizer.json`` as torchtitan's tokenizer: plain ids, no BOS/EOS added."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.tokenizer = Tokenizer.from_file(str(self.path))
        found = (self.tokenizer.token_to_id(t) for t in KNOWN_EOS_TOKENS)
        self.eos_id = next((i for i in found if i is not None), None)
        if self.eos_id is None:
            raise ValueError(f"{self.path} has no end-of-text token (looked for "
                             f"{', '.join(KNOWN_EOS_TOKENS)}); documents could not be separated")

    def encode(self, text: str) -> list[int]:  # type: ignore[override]
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:  # type: ignore[override]
        return self.tokenizer.decode(ids)

    def get_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()
