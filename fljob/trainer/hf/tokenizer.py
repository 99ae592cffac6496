"""The run's tokenizer, found from a checkpoint, as Hugging Face tokenizer files.

Where the trainer's tokenizer is (``fljob/trainer/data/prepare.py``), first found wins:

1. ``--tokenizer`` (a path or ``s3://`` URI), when given;
2. the spec's ``data.tokenizer``, when set (the trainer used it as it is);
3. ``<run folder>/data/tokenizer.json``: the run's own copy (trained there for the bundled
   text, or fetched from ``data.tokenizer``/the stream), in the run folder named on the
   command line, else in the spec's ``run_dir``;
4. ``tokenizer.json`` beside the first data stream (what ``fljob data prepare`` stores).

Its vocabulary must be the checkpoint's embedding rows: a tokenizer of another run would
pair ids with the wrong embeddings, so a mismatch is an error, not a fallback.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fljob import storage
from fljob.errors import UsageError
from fljob.spec.models import JobSpec
from fljob.trainer.data.mds_prepare import TOKENIZER_FILE
from fljob.trainer.data.tokenizer import TokenizerFile


def candidates(spec: JobSpec, run_folder: Path | None, explicit: str | None) -> list[str]:
    """Where to look, in order (see the module docstring)."""
    if explicit:
        return [explicit]
    found = [spec.data.tokenizer] if spec.data.tokenizer else []
    found += [str(folder / "data" / TOKENIZER_FILE)
              for folder in dict.fromkeys(f for f in (run_folder, Path(spec.resolved_run_dir)) if f)]
    found += [storage.join(spec.data.streams[0].uri, TOKENIZER_FILE)] if spec.data.streams else []
    return found


@dataclass(frozen=True)
class HFTokenizer:
    """The tokenizer's files for a Hugging Face folder, and the tokenizer itself."""

    source: str
    files: dict[str, bytes]
    tokenizer: TokenizerFile


def hf_tokenizer(spec: JobSpec, run_folder: Path | None, explicit: str | None, *,
                 vocab_size: int, max_length: int) -> HFTokenizer:
    """The first tokenizer found, checked against ``vocab_size``: its ``tokenizer.json`` as
    it is, and a ``tokenizer_config.json`` that ``AutoTokenizer`` of transformers 4 and 5
    reads as a fast tokenizer adding no BOS/EOS (as fljob trained)."""
    looked = candidates(spec, run_folder, explicit)
    for where in looked:
        data = storage.read_bytes(where)
        if data is not None:
            break
    else:
        raise UsageError(f"no tokenizer found (looked in {', '.join(looked) or 'no place'}); "
                         "name the run's tokenizer.json with --tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TOKENIZER_FILE
        path.write_bytes(data)
        try:
            ours = TokenizerFile(path)
        except Exception as exc:  # noqa: BLE001  (tokenizers raises its own exception types)
            raise UsageError(f"{where} is not a usable tokenizer.json ({exc})") from None
    if ours.get_vocab_size() != vocab_size:
        raise UsageError(f"the tokenizer {where} has {ours.get_vocab_size()} tokens, the "
                         f"checkpoint's embedding {vocab_size} rows: it is another run's; "
                         "name the right one with --tokenizer")
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "eos_token": ours.tokenizer.id_to_token(ours.eos_id),
              "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    files = {TOKENIZER_FILE: data, "tokenizer_config.json": json.dumps(config, indent=1).encode()}
    return HFTokenizer(where, files, ours)
