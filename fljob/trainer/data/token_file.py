"""A flat token file: every document's ids, EOS-separated, as raw uint16 or uint32.

Raw little-endian integers are read back with ``np.memmap``, so any rank reads any window
without loading the file; the JSON sidecar says how to read them and what produced them,
which is how preparation knows whether an existing file is still valid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TokenFileInfo:
    """The sidecar: enough to read the tokens and to tell whether they are stale."""

    dtype: str
    num_tokens: int
    tokenizer_sha256: str
    source: str


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def read_info(path: Path) -> TokenFileInfo | None:
    """The sidecar of ``path``, or None when there is no complete token file there."""
    try:
        return TokenFileInfo(**json.loads(sidecar(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_token_file(path: Path, documents: Iterable[list[int]], *, eos_id: int,
                     vocab_size: int, tokenizer_sha256: str, source: str) -> TokenFileInfo:
    """Write ``documents`` (each followed by EOS) to ``path`` and its sidecar, atomically.

    The sidecar is written last, so a reader that finds it finds a complete file; two
    writers racing on a shared filesystem leave one whole copy.
    """
    dtype = token_dtype(vocab_size)
    ids = np.fromiter((i for doc in documents for i in (*doc, eos_id)), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids outside [0, {vocab_size})")
    info = TokenFileInfo(dtype=dtype.str, num_tokens=int(ids.size),
                         tokenizer_sha256=tokenizer_sha256, source=source)
    _atomic_write(path, ids.astype(dtype).tobytes())
    _atomic_write(sidecar(path), (json.dumps(asdict(info), indent=2) + "\n").encode())
    return info


def open_tokens(path: Path) -> np.ndarray:
    """The token ids of a complete token file, memory-mapped read-only."""
    info = read_info(path)
    if info is None:
        raise FileNotFoundError(f"no token file at {path} (its sidecar {sidecar(path)} is missing)")
    return np.memmap(path, dtype=np.dtype(info.dtype), mode="r", shape=(info.num_tokens,))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
