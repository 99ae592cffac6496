"""``fljob data prepare SRC DEST``: text -> tokenized, packed, zstd-compressed MDS shards.

Documents (text files, JSONL records, a folder of either, or the bundled corpus) are
tokenized, joined into one stream with EOS after each document, and cut into samples of
``seq_len + 1`` tokens that overlap by one token (sample ``i`` is tokens ``[i*L, i*L+L]``),
so every token after the first is a training target exactly once. Samples go into MDS
shards through streaming's ``MDSWriter``, to a local folder or an ``s3://`` prefix.

DEST holds, besides MDS's own shards and ``index.json``, the ``tokenizer.json`` that
produced the ids and ``fljob_index.json`` (token counts, seq_len, tokenizer hash). The
fljob index is written last and is the completion marker: the trainer refuses a stream
without one.

All or nothing: DEST must be empty (or hold only a dataset, which ``--overwrite`` removes
first), options, SRC and DEST's writability are checked before anything is written, and a
run that fails half-way (bad input found late, a full disk, a refused upload) removes
everything it wrote. Should that removal fail too, the partial dataset has no
``fljob_index.json``; a later run refuses it by name until ``--overwrite`` replaces it.

Input must be text: a file or JSONL record that is not UTF-8, holds NUL characters or is
mostly control characters stops the run with its name (and line), never a corpus of
replacement characters.

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
import logging
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from fljob import storage
from fljob.errors import JobFailed, UsageError
from fljob.exitcodes import FAILED
from fljob.files import cause, check_writable
from fljob.trainer.data.split import held_out
from fljob.trainer.data.streaming_compat import import_streaming
from fljob.trainer.data.text import bundled_documents, bundled_source
from fljob.trainer.data.token_file import token_dtype
from fljob.trainer.model.flavors import DEFAULT_VOCAB_SIZE

if TYPE_CHECKING:  # imported where used: torchtitan takes seconds, and refusals come first
    from fljob.trainer.data.tokenizer import TokenizerFile

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
DATASET_FILE = re.compile(rf"({TRAIN_SPLIT}/|{VALIDATION_SPLIT}/)?"
                          r"(\.?(index|tokenizer|fljob_index)\.json(\.\d+\.tmp)?"
                          r"|shard\.\d+\.mds(\.\w+)?)?")
"""What a preparation writes under DEST (relative names; the split folders and the temp
files of a stopped run too): all that ``--overwrite`` removes."""
DEFAULT_TEXT_FIELD = "text"
MIN_VOCAB_SIZE = 257
"""The byte-level BPE's 256 byte tokens and its end-of-text token."""
MAX_VOCAB_SIZE = 2**32
"""Token ids are stored as uint32 at most."""
MAX_SHARD_SIZE = 2**32
"""streaming keeps sample offsets within a shard as uint32."""
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
"""Control characters (tab, newlines, vertical tab and form feed are text)."""
MAX_CONTROL_FRACTION = 0.1
"""More control characters than this is binary data (text has next to none)."""
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
              bool: "boolean", type(None): "null"}
"""JSON's names of what a JSONL record or field holds, for the error line."""

Route = Callable[[str], int]
"""Which output a document's text goes to (an index into the outputs)."""


@dataclass(frozen=True)
class PrepareConfig:
    src: str
    dest: str
    seq_len: int = 128
    tokenizer: str | None = None
    vocab_size: int = DEFAULT_VOCAB_SIZE
    text_field: str = DEFAULT_TEXT_FIELD
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


def iter_documents(src: str, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[tuple[str, int]]:
    """Every document of ``src`` in a fixed order, with the input bytes it consumed.

    A text file is one document; a JSONL file is one document per record's ``text_field``.
    Input that is not text is a UsageError naming the file (and line): see :func:`_text`.
    """
    if src == BUILTIN_SOURCE:
        for doc in bundled_documents():
            yield doc, len(doc.encode())
        return
    for path in _source_files(src):
        try:
            if path.suffix not in JSONL_SUFFIXES:
                data = path.read_bytes()
                yield _text(data, str(path)), len(data)
                continue
            with open(path, "rb") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        yield _record_text(line, f"{path}:{number}", text_field), len(line)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {cause(exc)}") from None


def _decode(data: bytes, where: str) -> str:
    """UTF-8 ``data`` as text (a byte-order mark dropped), or a UsageError naming ``where``."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start}); convert it (iconv -t UTF-8) or move it out of SRC"
                         ) from None


def _check_text(text: str, where: str) -> str:
    """``text``, or a UsageError naming ``where`` when it is binary data: NUL characters
    (UTF-16 decodes to them too) or mostly control characters."""
    if "\x00" in text:
        raise UsageError(f"{where} holds NUL characters: binary data (or UTF-16), not text; "
                         "convert it to UTF-8 text or move it out of SRC")
    controls = len(CONTROL_CHARACTER.findall(text))
    if controls > MAX_CONTROL_FRACTION * len(text):
        raise UsageError(f"{where} is {controls / len(text):.0%} control characters: binary data, "
                         "not text; move it out of SRC")
    return text


def _text(data: bytes, where: str) -> str:
    """A text file's content as one document (see :func:`_decode` and :func:`_check_text`)."""
    return _check_text(_decode(data, where), where)


def _record_text(line: bytes, where: str, text_field: str) -> str:
    """The ``text_field`` of one JSONL record, or a UsageError naming ``where`` and why."""
    try:
        record = json.loads(_decode(line, where))
    except ValueError:
        raise UsageError(f"{where} is not JSON; fix the record (one JSON object per line)"
                         ) from None
    if not isinstance(record, dict):
        raise UsageError(f"{where} is a JSON {JSON_TYPES[type(record)]}, not an object with a "
                         f"{text_field!r} field; fix the record (one JSON object per line)")
    if text_field not in record:
        raise UsageError(f"{where} has no {text_field!r} field; fix the record or name the field "
                         "with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise UsageError(f"{where}: {text_field!r} is a JSON {JSON_TYPES[type(text)]}, not a "
                         "string; name the text field with --text-field")
    return _check_text(text, where)


def describe_source(src: str) -> str:
    return bundled_source() if src == BUILTIN_SOURCE else str(Path(src).resolve())


# ---------------------------------------------------------------------------- tokenizer


def load_or_train_tokenizer(config: PrepareConfig, workdir: Path,
                            route: Route = lambda text: 0) -> TokenizerFile:
    """The given tokenizer.json (path or URI), else a BPE trained on the input documents
    that ``route`` sends to the first output (the training split)."""
    from fljob.trainer.data.tokenizer import TokenizerFile, train_bpe

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


def _check_options(config: PrepareConfig) -> None:
    """Raise a UsageError for an option value that cannot work, before anything is read."""
    if config.seq_len < 8:
        raise UsageError(f"--seq-len {config.seq_len} is too short; use at least 8")
    if config.tokenizer is None and not MIN_VOCAB_SIZE <= config.vocab_size <= MAX_VOCAB_SIZE:
        raise UsageError(f"--vocab-size {config.vocab_size} is out of range: a byte-level BPE "
                         f"needs at least {MIN_VOCAB_SIZE} (256 bytes and the end-of-text token), "
                         f"and ids are stored in 32 bits at most ({MAX_VOCAB_SIZE})")
    if not config.text_field:
        raise UsageError("--text-field is empty; name the JSONL field that holds the text")


def _shard_limit(config: PrepareConfig) -> int:
    """The --shard-size in bytes, read as MDSWriter reads it, or a UsageError."""
    import_streaming()
    from streaming.base.util import bytes_to_int

    try:
        limit = bytes_to_int(config.shard_size)
    except (ValueError, OverflowError):  # "banana"; "infmb"
        limit = 0
    if not 0 < limit < MAX_SHARD_SIZE:
        raise UsageError(f"--shard-size {config.shard_size!r} is not a size above 0 and below "
                         "4gb; write e.g. 64mb, 1gb or 512kb")
    return limit


def _check_source(config: PrepareConfig) -> int:
    """Raise a UsageError for a SRC that does not exist or does not fit the options; return
    its size in bytes (for the progress bar)."""
    size = source_size(config.src)
    if config.text_field != DEFAULT_TEXT_FIELD and (
            config.src == BUILTIN_SOURCE
            or not any(p.suffix in JSONL_SUFFIXES for p in _source_files(config.src))):
        raise UsageError(f"--text-field {config.text_field!r} names a field of JSONL records, but "
                         f"{config.src} holds no {'/'.join(JSONL_SUFFIXES)} files; leave it out")
    return size


def _contents(dest: str) -> Iterator[str]:
    """Everything under DEST, relative to it ('/'-separated; local folders end in '/')."""
    if storage.is_s3(dest):
        bucket, prefix = storage.split_s3(dest)
        start = f"{prefix}/" if prefix else ""
        pages = storage.s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=start)
        yield from (o["Key"][len(start):] for page in pages for o in page.get("Contents", []))
    elif Path(dest).is_dir():
        root = Path(dest)
        yield from (p.relative_to(root).as_posix() + ("/" if p.is_dir() else "")
                    for p in root.rglob("*"))


def _check_destination(config: PrepareConfig) -> Path | None:
    """Refuse DEST before anything is written: a file or below one, unwritable, or not empty
    (a dataset: unless --overwrite; anything else: always, --overwrite removes only datasets).
    Returns the outermost folder of a local DEST that the run will create, if any."""
    dest, created = config.dest, None
    if storage.is_s3(dest):
        _check_s3_writable(dest)
    else:
        path = Path(dest)
        if path.exists() and not path.is_dir():
            raise UsageError(f"DEST {dest} is a file; give a folder or an s3:// prefix")
        check_writable(path)
        created = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    names = []
    for name in _contents(dest):  # stops at the first stranger: DEST may be a big folder
        if not DATASET_FILE.fullmatch(name):
            raise UsageError(f"DEST {dest} holds {name}, which fljob data prepare did not write; "
                             "choose a new folder or prefix (--overwrite replaces only a dataset)")
        names.append(name)
    if names and not config.overwrite:
        what = ("a prepared dataset" if any(n.endswith(INDEX_FILE) for n in names) else
                f"a partial dataset (no {INDEX_FILE}: a preparation stopped half-way)")
        raise UsageError(f"DEST {dest} holds {what}; pass --overwrite to replace it, or choose "
                         "a new folder or prefix")
    return created


def _check_s3_writable(dest: str) -> None:
    """Refuse an s3:// DEST whose bucket is missing or unreachable, or that the credentials
    may not write to: an empty probe object is written and deleted at once."""
    from botocore.exceptions import BotoCoreError, ClientError

    storage.check_bucket(dest)
    bucket, key = storage.split_s3(storage.join(dest, f".fljob-probe-{uuid.uuid4().hex}"))
    client = storage.s3_client()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"")
        client.delete_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as exc:
        raise UsageError(f"cannot write {dest}: {_why(exc)}; check that the server is up and the "
                         f"credentials may write and delete objects in bucket {bucket!r}, or give "
                         "another DEST") from None


def _why(exc: Exception) -> str:
    """A failed write in words: the file system's cause, the S3 server's error code, or the
    S3 client's error."""
    from botocore.exceptions import ClientError

    if isinstance(exc, OSError):
        return cause(exc)
    if isinstance(exc, ClientError):
        return f"the S3 server answered {exc.response.get('Error', {}).get('Code', '?')}"
    return f"{type(exc).__name__}: {exc}"


def _remove_contents(dest: str) -> None:
    """Delete everything under DEST: the dataset --overwrite replaces, or what a failed run
    wrote (DEST held nothing else: see :func:`_check_destination`)."""
    if storage.is_s3(dest):
        client, (bucket, _) = storage.s3_client(), storage.split_s3(dest)
        for name in list(_contents(dest)):
            client.delete_object(Bucket=bucket, Key=storage.split_s3(storage.join(dest, name))[1])
        return
    for entry in Path(dest).iterdir() if Path(dest).is_dir() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _remove_written(dest: str, created: Path | None) -> None:
    """Undo a failed run: the outermost folder it created for a local DEST, whole; else
    DEST's contents (it was empty, or held a dataset that --overwrite had already removed)."""
    if created is None:
        _remove_contents(dest)
    elif created.exists():
        shutil.rmtree(created)


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
    (DEST, the source label of its index). Returns the indexes, in the outputs' order.

    Everything that can be checked is checked before the first write (UsageError, nothing
    written); a failure after it removes what was written (see :func:`_failed`)."""
    _check_options(config)
    source_bytes = _check_source(config)
    created = _check_destination(config)
    shard_limit = _shard_limit(config)
    streaming = import_streaming()
    with tempfile.TemporaryDirectory(prefix="fljob-prepare-") as tmp:
        tokenizer = load_or_train_tokenizer(config, Path(tmp), route)
        assert tokenizer.eos_id is not None  # TokenizerFile refuses tokenizers without one
        dtype = token_dtype(tokenizer.get_vocab_size())
        sample_tokens = config.seq_len + 1
        sample_bytes = sample_tokens * dtype.itemsize
        if sample_bytes > shard_limit:
            raise UsageError(f"--seq-len {config.seq_len}: one sample ({sample_bytes} bytes) is "
                             f"larger than --shard-size {config.shard_size}; lower --seq-len or "
                             "raise --shard-size (below 4gb)")
        written: list[_Output] = []
        with _quiet_uploads() as uploads:
            try:
                if config.overwrite:
                    _remove_contents(config.dest)
                for dest, source in outputs:
                    writer = streaming.MDSWriter(
                        out=dest, columns={TOKENS_COLUMN: f"ndarray:{dtype.name}:{sample_tokens}"},
                        compression=config.compression or None, hashes=["xxh64"],
                        size_limit=shard_limit)
                    packer = SamplePacker(config.seq_len, tokenizer.eos_id, dtype)
                    written.append(_Output(dest, source, writer, packer))
                with tqdm(total=source_bytes, unit="B", unit_scale=True, disable=not progress,
                          desc=f"prepare {config.dest}") as bar:
                    for text, size in iter_documents(config.src, config.text_field):
                        written[route(text)].add(text, tokenizer)
                        bar.update(size)
                return _finish(config, written, tokenizer)
            except BaseException as exc:  # removes what was written, then re-raises
                replacement = _failed(exc, config.dest, created, [out.writer for out in written],
                                      uploads)
                if replacement is exc:
                    raise
                raise replacement from None


def _finish(config: PrepareConfig, written: list[_Output],
            tokenizer: TokenizerFile) -> list[DatasetIndex]:
    """The last batches, a check that every output got samples, then the shards' index,
    tokenizer.json and, once every output has those, each output's marker."""
    for out in written:
        out.flush(tokenizer)
    for out in written:
        _check_enough(config, out, len(written))
    tokenizer_json = tokenizer.path.read_bytes()
    indexes = []
    for out in written:
        out.writer.finish()  # shards, then MDS's index.json
        indexes.append(DatasetIndex(
            format=INDEX_FORMAT, documents=out.documents, tokens=out.tokens,
            samples=out.samples, seq_len=config.seq_len,
            dropped_tokens=max(len(out.packer.pending) - 1, 0), dtype=out.packer.dtype.name,
            vocab_size=tokenizer.get_vocab_size(), eos_id=tokenizer.eos_id,
            tokenizer_sha256=hashlib.sha256(tokenizer_json).hexdigest(), source=out.source))
        storage.write_bytes(storage.join(out.dest, TOKENIZER_FILE), tokenizer_json)
    for out, index in zip(written, indexes, strict=True):
        storage.write_bytes(storage.join(out.dest, INDEX_FILE), index.to_json())  # the marker
    return indexes


def _check_enough(config: PrepareConfig, out: _Output, outputs: int) -> None:
    """A UsageError when ``out`` got no sample: no documents, empty ones, or too few tokens
    (an empty corpus is refused, never written as a dataset of end-of-text tokens)."""
    if out.samples:
        return
    what = config.src if outputs == 1 else f"{out.dest} (of {config.src})"
    empty = out.tokens == out.documents  # end-of-text tokens only
    got = ("no documents" if not out.documents
           else f"only empty documents ({out.documents})" if empty
           else f"{out.tokens} tokens, not enough for one sample of {config.seq_len + 1}")
    raise UsageError(f"{what} holds {got}; add text" + ("" if empty else " or lower --seq-len")
                     + ("" if outputs == 1 else ", or change --validation-fraction"))


class _UploadErrors(logging.Handler):
    """streaming's upload threads only log their errors (then ``write`` raises a bare
    Exception), and its done-callback logs a CancelledError traceback for each upload
    cancelled after one. Installed by :func:`_quiet_uploads`: keeps the first error for the
    one-line message, prints none of it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None:
            self.first = record.getMessage().removeprefix("Exception in writer thread: ")


def _not_cancelled(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], CancelledError))


@contextmanager
def _quiet_uploads() -> Iterator[_UploadErrors]:
    """streaming's log and the cancelled uploads' tracebacks go to an :class:`_UploadErrors`."""
    errors, streaming_log = _UploadErrors(), logging.getLogger("streaming")
    futures_log, propagate = logging.getLogger("concurrent.futures"), streaming_log.propagate
    streaming_log.addHandler(errors)
    streaming_log.propagate = False
    futures_log.addFilter(_not_cancelled)
    try:
        yield errors
    finally:
        futures_log.removeFilter(_not_cancelled)
        streaming_log.propagate = propagate
        streaming_log.removeHandler(errors)


def _failed(exc: BaseException, dest: str, created: Path | None, writers: list[Any],
            uploads: _UploadErrors) -> BaseException:
    """What to raise for a failure once writing has begun: everything written is
    removed first (:func:`_remove_written`), and the error line says whether that worked.

    Bad input found late stays a UsageError (exit 2); a failed write (a full disk, a refused
    upload) is a JobFailed (exit 1) naming the path and the cause; anything else (an
    interrupt, a bug) is raised as it is, traceback and all.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    for writer in writers:  # uploads under way end first: none may land after the removal
        writer.executor.shutdown(wait=True, cancel_futures=True)
        if writer.remote:  # the staging folder of an upload
            shutil.rmtree(writer.local, ignore_errors=True)
    try:
        _remove_written(dest, created)
        left = "; what it wrote was removed"
    except (OSError, BotoCoreError, ClientError) as undo:
        left = (f"; what it wrote could not be removed ({_why(undo)}): a later run refuses "
                f"{dest} until --overwrite replaces it")
    if isinstance(exc, UsageError):
        return UsageError(f"{exc}{left}")
    if isinstance(exc, OSError | BotoCoreError | ClientError):
        where = getattr(exc, "filename", None) or dest
        return JobFailed(FAILED, f"cannot write {where}: {_why(exc)}{left}")
    if any(writer.event.is_set() for writer in writers):  # streaming's upload threads failed
        why = uploads.first or "an upload failed"
        return JobFailed(FAILED, f"cannot write {dest}: {why}{left}")
    return exc


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
