"""``fljob data prepare SRC DEST``: text -> tokenized, packed, zstd-compressed MDS shards.

Documents (text files, JSONL records, a folder of either, or the bundled corpus) are
tokenized, joined into one stream with EOS after each document, and cut into samples of
``seq_len + 1`` tokens that overlap by one token (sample ``i`` is tokens ``[i*L, i*L+L]``),
so every token after the first is a training target exactly once. Samples go into MDS
shards through streaming's ``MDSWriter``, to a local folder or an ``s3://`` prefix.

DEST holds, besides MDS's own shards and ``index.json``, the ``tokenizer.json`` that
produced the ids and ``fljob_index.json`` (token counts, seq_len, tokenizer hash). The
fljob index is written last and is the completion marker: a run that fails half-way
leaves no ``fljob_index.json``, and the trainer refuses a stream without one.

With a validation fraction (:func:`prepare_split`), each document goes whole to
``DEST/train`` or ``DEST/validation`` (:mod:`.split`: by a hash of its text, so the split is
disjoint and the same every time), and each of the two folders is a complete dataset as
above, with the same ``tokenizer.json``; a trained BPE learns from the training documents
only. They are what ``data.streams`` and ``data.validation`` name.

The bundled corpus (``builtin:pydoc``) is Python's ``pydoc_data.topics``, see
:mod:`fljob.trainer.data.text`: it ships with every CPython, so a fresh machine with no
network prepares and trains on real English text.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fljob import storage
from fljob.errors import UsageError
from fljob.trainer.data.split import held_out
from fljob.trainer.data.streaming_compat import import_streaming
from fljob.trainer.data.text import bundled_documents, bundled_source
from fljob.trainer.data.token_file import token_dtype
from fljob.trainer.data.tokenizer import TokenizerFile, train_bpe
from fljob.trainer.model.flavors import DEFAULT_VOCAB_SIZE

BUILTIN_SOURCE = "builtin:pydoc"
"""SRC that names the bundled corpus."""

INDEX_FILE = "fljob_index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENS_COLUMN = "tokens"
INDEX_FORMAT = "fljob-mds-tokens/1"
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
ENCODE_BATCH = 256
"""Documents tokenized per call (the Rust tokenizer parallelises within a batch)."""
TRAIN_SPLIT, VALIDATION_SPLIT = "train", "validation"
"""The folders under DEST that :func:`prepare_split` writes."""

Route = Callable[[str], int]
"""Which output a document's text goes to (an index into the outputs)."""


@dataclass(frozen=True)
class PrepareConfig:
    src: str
    dest: str
    seq_len: int = 128
    tokenizer: str | None = None
    vocab_size: int = DEFAULT_VOCAB_SIZE
    text_field: str = "text"
    compression: str = "zstd"
    shard_size: str = "64mb"
    overwrite: bool = False


@dataclass(frozen=True)
class DatasetIndex:
    """``fljob_index.json``: what a prepared dataset holds and what produced it."""

    format: str
    documents: int
    tokens: int
    samples: int
    seq_len: int
    dropped_tokens: int
    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer_sha256: str
    source: str

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()


def read_index(uri: str) -> DatasetIndex | None:
    """The fljob index of the dataset at ``uri``, or None when it is missing (incomplete)."""
    data = storage.read_bytes(storage.join(uri, INDEX_FILE))
    return None if data is None else DatasetIndex(**json.loads(data))


# ------------------------------------------------------------------------------ sources


def _source_files(src: str) -> list[Path]:
    path = Path(src)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if files:
            return files
        raise UsageError(f"{src} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files; "
                         "point SRC at a folder of text or JSONL files")
    raise UsageError(f"SRC {src!r} does not exist; give a text file, a JSONL file, a folder "
                     f"of them, or {BUILTIN_SOURCE} for the bundled corpus")


def source_size(src: str) -> int:
    """Bytes of input, for the progress bar."""
    if src == BUILTIN_SOURCE:
        return sum(len(d.encode()) for d in bundled_documents())
    return sum(p.stat().st_size for p in _source_files(src))


def iter_documents(src: str, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """Every document of ``src`` in a fixed order, with the input bytes it consumed.

    A text file is one document; a JSONL file is one document per record's ``text_field``.
    """
    if src == BUILTIN_SOURCE:
        for doc in bundled_documents():
            yield doc, len(doc.encode())
        return
    for path in _source_files(src):
        if path.suffix not in JSONL_SUFFIXES:
            yield path.read_text(encoding="utf-8", errors="replace"), path.stat().st_size
            continue
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError):
                    raise UsageError(
                        f"{path}:{number} is not a JSON object with a string {text_field!r} "
                        "field; fix the record or name the field with --text-field") from None
                if not isinstance(text, str):
                    raise UsageError(f"{path}:{number}: {text_field!r} is not a string; "
                                     "name the text field with --text-field")
                yield text, len(line)


def describe_source(src: str) -> str:
    return bundled_source() if src == BUILTIN_SOURCE else str(Path(src).resolve())


# ---------------------------------------------------------------------------- tokenizer


def load_or_train_tokenizer(config: PrepareConfig, workdir: Path,
                            route: Route = lambda text: 0) -> TokenizerFile:
    """The given tokenizer.json (path or URI), else a BPE trained on the input documents
    that ``route`` sends to the first output (the training split)."""
    target = workdir / TOKENIZER_FILE
    if config.tokenizer is None:
        texts = (text for text, _ in iter_documents(config.src, config.text_field)
                 if route(text) == 0)
        train_bpe(texts, config.vocab_size).save(str(target))
    else:
        data = storage.read_bytes(config.tokenizer)
        if data is None:
            raise UsageError(f"--tokenizer {config.tokenizer}: no such file or object; give a "
                             "tokenizer.json path or s3:// URI, or leave it out to train one")
        target.write_bytes(data)
    try:
        return TokenizerFile(target)
    except ValueError as exc:  # no end-of-text token
        raise UsageError(f"--tokenizer {config.tokenizer}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise UsageError(f"--tokenizer {config.tokenizer} is not a tokenizer.json ({exc}); "
                         "give a Hugging Face tokenizers file") from None


# ------------------------------------------------------------------------------ packing


class SamplePacker:
    """Joins token ids into one EOS-separated stream and cuts it into overlapping samples."""

    def __init__(self, seq_len: int, eos_id: int, dtype: np.dtype) -> None:
        self.seq_len, self.eos_id, self.dtype = seq_len, eos_id, dtype
        self.pending = np.zeros(0, dtype=dtype)

    def add(self, documents: list[list[int]]) -> np.ndarray:
        """Append ``documents``; return the complete samples, shape ``[n, seq_len + 1]``."""
        ids = [np.asarray(doc + [self.eos_id], dtype=self.dtype) for doc in documents]
        stream = np.concatenate([self.pending, *ids])
        n = max(len(stream) - 1, 0) // self.seq_len
        starts = np.arange(n) * self.seq_len
        samples = stream[starts[:, None] + np.arange(self.seq_len + 1)]
        self.pending = stream[n * self.seq_len:]
        return samples


# ----------------------------------------------------------------------------- prepare


def _check_destination(config: PrepareConfig, dests: list[str]) -> None:
    """DEST must be empty, or replaced (``--overwrite``): then every dataset about to be
    written is unmarked first, so that a failure below cannot leave an old one "complete"."""
    if storage.is_s3(config.dest):
        storage.check_bucket(config.dest)
        bucket, prefix = storage.split_s3(config.dest)
        listing = storage.s3_client().list_objects_v2(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
        occupied = listing.get("KeyCount", 0) > 0
    else:
        path = Path(config.dest)
        if path.exists() and not path.is_dir():
            raise UsageError(f"DEST {config.dest} is a file; give a folder or an s3:// prefix")
        occupied = path.is_dir() and any(path.iterdir())
    if occupied and not config.overwrite:
        raise UsageError(f"DEST {config.dest} is not empty; choose a new folder or prefix, or "
                         "pass --overwrite to replace what is there")
    if occupied:
        for dest in dests:
            storage.delete(storage.join(dest, INDEX_FILE))


def prepare_mds(config: PrepareConfig, progress: bool = True) -> DatasetIndex:
    """Write the dataset of ``config`` to DEST; return its index (also written to DEST)."""
    (index,) = _prepare(config, [(config.dest, describe_source(config.src))], lambda text: 0,
                        progress)
    return index


def prepare_split(config: PrepareConfig, validation_fraction: float,
                  progress: bool = True) -> dict[str, DatasetIndex]:
    """Write SRC's documents to ``DEST/train`` and ``DEST/validation``, holding out
    ``validation_fraction`` of them (see the module docstring); URI -> index of each."""
    if not 0 < validation_fraction < 1:
        raise UsageError(f"--validation-fraction {validation_fraction} must lie between 0 and 1 "
                         "(e.g. 0.01 holds out about 1% of the documents)")
    source = describe_source(config.src)
    outputs = [(storage.join(config.dest, split),
                f"{source}, {split} split at validation fraction {validation_fraction}")
               for split in (TRAIN_SPLIT, VALIDATION_SPLIT)]
    indexes = _prepare(config, outputs, lambda text: int(held_out(text, validation_fraction)),
                       progress)
    return {dest: index for (dest, _), index in zip(outputs, indexes, strict=True)}


@dataclass
class _Output:
    """One dataset being written, and what went into it so far."""

    dest: str
    source: str
    writer: Any  # streaming.MDSWriter
    packer: SamplePacker
    texts: list[str] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    samples: int = 0

    def add(self, text: str, tokenizer: TokenizerFile) -> None:
        self.texts.append(text)
        if len(self.texts) == ENCODE_BATCH:
            self.flush(tokenizer)

    def flush(self, tokenizer: TokenizerFile) -> None:
        d, t, s = _write_batch(self.writer, self.packer, tokenizer, self.texts)
        self.documents, self.tokens, self.samples = self.documents + d, self.tokens + t, self.samples + s
        self.texts = []


def _prepare(config: PrepareConfig, outputs: list[tuple[str, str]], route: Route,
             progress: bool) -> list[DatasetIndex]:
    """Write every document of SRC to the output ``route`` picks; ``outputs`` are
    (DEST, the source label of its index). Returns the indexes, in the outputs' order."""
    if config.seq_len < 8:
        raise UsageError(f"--seq-len {config.seq_len} is too short; use at least 8")
    source_bytes = source_size(config.src)  # validates SRC before anything is written
    _check_destination(config, [dest for dest, _ in outputs])
    streaming = import_streaming()
    with tempfile.TemporaryDirectory(prefix="fljob-prepare-") as tmp:
        tokenizer = load_or_train_tokenizer(config, Path(tmp), route)
        assert tokenizer.eos_id is not None  # TokenizerFile refuses tokenizers without one
        vocab = tokenizer.get_vocab_size()
        dtype = token_dtype(vocab)
        written = [_Output(dest, source, streaming.MDSWriter(
            out=dest, columns={TOKENS_COLUMN: f"ndarray:{dtype.name}:{config.seq_len + 1}"},
            compression=config.compression or None, hashes=["xxh64"],
            size_limit=config.shard_size, exist_ok=config.overwrite),
            SamplePacker(config.seq_len, tokenizer.eos_id, dtype)) for dest, source in outputs]
        try:
            with tqdm(total=source_bytes, unit="B", unit_scale=True, disable=not progress,
                      desc=f"prepare {config.dest}") as bar:
                for text, size in iter_documents(config.src, config.text_field):
                    written[route(text)].add(text, tokenizer)
                    bar.update(size)
                for out in written:
                    out.flush(tokenizer)
            for out in written:
                if out.samples == 0:
                    what = config.src if len(written) == 1 else f"{out.dest} (of {config.src})"
                    raise UsageError(
                        f"{what} holds {out.tokens} tokens, not enough for one sample of "
                        f"{config.seq_len + 1}; add text or lower --seq-len"
                        + ("" if len(written) == 1 else ", or change --validation-fraction"))
        except BaseException:
            for out in written:
                out.writer.cancel_future_jobs()
                if out.writer.remote:  # the staging folder of an upload
                    shutil.rmtree(out.writer.local, ignore_errors=True)
            raise
        indexes = []
        for out in written:
            out.writer.finish()  # shards, then MDS's index.json
            indexes.append(DatasetIndex(
                format=INDEX_FORMAT, documents=out.documents, tokens=out.tokens,
                samples=out.samples, seq_len=config.seq_len,
                dropped_tokens=max(len(out.packer.pending) - 1, 0), dtype=dtype.name,
                vocab_size=vocab, eos_id=tokenizer.eos_id,
                tokenizer_sha256=hashlib.sha256(tokenizer.path.read_bytes()).hexdigest(),
                source=out.source))
            storage.write_bytes(storage.join(out.dest, TOKENIZER_FILE), tokenizer.path.read_bytes())
    for out, index in zip(written, indexes, strict=True):
        storage.write_bytes(storage.join(out.dest, INDEX_FILE), index.to_json())  # the marker
    return indexes


def _write_batch(writer, packer: SamplePacker, tokenizer: TokenizerFile,
                 texts: list[str]) -> tuple[int, int, int]:
    """Tokenize and write ``texts``: (documents, tokens incl. EOS, samples) added."""
    if not texts:
        return 0, 0, 0
    ids = tokenizer.encode_batch(texts)
    samples = packer.add(ids)
    for sample in samples:
        writer.write({TOKENS_COLUMN: sample})
    return len(texts), sum(len(doc) + 1 for doc in ids), len(samples)
