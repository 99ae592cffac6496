"""Turn the bundled corpus into a tokenizer and two token files under ``<run_dir>/data``.

The bundled documents are split by :mod:`.split` at :data:`BUNDLED_VALIDATION_FRACTION`:
``tokens.bin`` holds the training documents and ``validation-tokens.bin`` the held-out ones
(``training.validation_interval`` evaluates on them). The BPE is trained on the training
documents only, so nothing of the held-out text reaches the run except through evaluation.
The split does not depend on whether validation is on: turning it on never changes what a
run trains on.

Runs in every trainer process before the trainer is built (the tokenizer's vocabulary
sizes the model). Processes of one node serialise on a file lock; the first prepares, the
others find the files and reuse them. Outputs are deterministic and written atomically, so
nodes that share ``run_dir`` but not the lock still end up with one valid copy. A later run
in the same ``run_dir`` reuses the files while they match its tokenizer and vocabulary.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fljob.files import held_lock
from fljob.spec.models import JobSpec
from fljob.trainer.data.split import split_documents
from fljob.trainer.data.text import bundled_documents, bundled_source
from fljob.trainer.data.token_file import TokenFileInfo, read_info, write_token_file
from fljob.trainer.data.tokenizer import TokenizerFile, train_bpe

BUNDLED_VALIDATION_FRACTION = 0.2
"""Share of the bundled documents held out. One default evaluation needs 8 batches of 8 x 129
tokens on each data-parallel rank, 16.5k tokens on two ranks; 0.2 holds out 17 of CPython
3.11's 79 topics, about 18% of the text (19k tokens). Smaller fractions leave too little
(0.1 holds 10k tokens), larger ones take text the smoke-test runs train on. Where an
evaluation still does not fit (bigger batches, more ranks), it uses the batches there are."""


def data_dir(spec: JobSpec) -> Path:
    return Path(spec.resolved_run_dir) / "data"


def tokenizer_path(spec: JobSpec) -> Path:
    """The spec's local tokenizer.json, else the run's copy (trained, fetched or streamed)."""
    if spec.data.tokenizer is None or "://" in spec.data.tokenizer:
        return data_dir(spec) / "tokenizer.json"
    return Path(spec.data.tokenizer)


def tokens_path(spec: JobSpec) -> Path:
    return data_dir(spec) / "tokens.bin"


def validation_tokens_path(spec: JobSpec) -> Path:
    return data_dir(spec) / "validation-tokens.bin"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_bundled_text(spec: JobSpec, vocab_size: int) -> TokenFileInfo:
    """Make sure the run's tokenizer and both token files exist and match; return the
    training file's info.

    ``vocab_size`` is the size to train a BPE to when the spec names no tokenizer (the
    model flavor's); a previously trained one of another size is retrained.
    """
    directory = data_dir(spec)
    directory.mkdir(parents=True, exist_ok=True)
    with held_lock(directory / ".prepare.lock"):
        tok_path = tokenizer_path(spec)
        train, validation = split_documents(bundled_documents(), BUNDLED_VALIDATION_FRACTION)
        if spec.data.tokenizer is None and not _trained_with_size(tok_path, vocab_size):
            tmp = tok_path.with_name(f".{tok_path.name}.tmp")
            train_bpe(train, vocab_size).save(str(tmp))
            tmp.replace(tok_path)
        digest = sha256_of(tok_path)
        tokenizer: TokenizerFile | None = None
        infos = []
        for out, documents, split in ((tokens_path(spec), train, "train"),
                                      (validation_tokens_path(spec), validation, "validation")):
            source = f"{bundled_source()}, {split} split at {BUNDLED_VALIDATION_FRACTION}"
            info = read_info(out)
            if info is None or info.tokenizer_sha256 != digest or info.source != source:
                tokenizer = tokenizer or TokenizerFile(tok_path)
                assert tokenizer.eos_id is not None  # TokenizerFile refuses tokenizers without one
                info = write_token_file(
                    out, tokenizer.encode_batch(documents), eos_id=tokenizer.eos_id,
                    vocab_size=tokenizer.get_vocab_size(), tokenizer_sha256=digest, source=source)
            infos.append(info)
        return infos[0]


def prepare_stream_tokenizer(spec: JobSpec) -> Path:
    """Fetch the run's tokenizer when it is remote: ``data.tokenizer`` if it is a URI, else
    the ``tokenizer.json`` that ``fljob data prepare`` stored beside the first stream.

    A local ``data.tokenizer`` is used in place. Returns the path the trainer reads.
    """
    from fljob import storage
    from fljob.errors import UsageError
    from fljob.trainer.data.mds_prepare import TOKENIZER_FILE

    uris = {s.uri for s in [*spec.data.streams, *spec.data.validation]}
    for uri in uris | {spec.data.tokenizer or ""}:
        if storage.is_s3(uri):
            storage.check_bucket(uri)  # a wrong endpoint, secret or bucket: exit 2, one line
    path = tokenizer_path(spec)
    if spec.data.tokenizer is not None and "://" not in spec.data.tokenizer:
        return path
    uri = spec.data.tokenizer or storage.join(spec.data.streams[0].uri, TOKENIZER_FILE)
    directory = data_dir(spec)
    directory.mkdir(parents=True, exist_ok=True)
    with held_lock(directory / ".prepare.lock"):
        data = storage.read_bytes(uri)
        if data is None:
            raise UsageError(f"no tokenizer at {uri}: set data.tokenizer, or prepare the "
                             "stream with `fljob data prepare` (it stores tokenizer.json)")
        if not path.exists() or path.read_bytes() != data:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
    return path


def _trained_with_size(path: Path, vocab_size: int) -> bool:
    return path.exists() and TokenizerFile(path).get_vocab_size() == vocab_size


