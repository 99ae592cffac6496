"""The train/validation split, decided document by document from the text alone.

A document is held out when the first 8 bytes of the SHA-256 of its UTF-8 text, read as a
big-endian integer, fall below ``fraction * 2**64``. Nothing else enters the decision (not the
order of the corpus, the other documents, a seed or the machine), so:

* the split is the same in every run, on every rank and in ``fljob data prepare``;
* train and validation are disjoint, and a document repeated in the corpus lands on one side;
* adding documents to a corpus never moves the ones already there.

The held-out share of documents tends to ``fraction`` as the corpus grows; a small corpus
(the bundled text has under a hundred documents) lands near it, not on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

_SCALE = 2**64


def held_out(text: str, fraction: float) -> bool:
    """Whether ``text`` belongs to the validation split at ``fraction``."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * _SCALE


def split_documents(documents: Iterable[str], fraction: float) -> tuple[list[str], list[str]]:
    """``(train, validation)``, each in the documents' order."""
    train: list[str] = []
    validation: list[str] = []
    for doc in documents:
        (validation if held_out(doc, fraction) else train).append(doc)
    return train, validation
