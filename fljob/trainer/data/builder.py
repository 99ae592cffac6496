"""Choose the data source from the spec: the one place that knows which loaders exist.

``data.streams`` empty: the bundled text, prepared into token files in run_dir (training
documents, and the held-out ones for validation). Otherwise MDS streams (local folders or
``s3://``) written by ``fljob data prepare``, read by the streaming loader, with
``data.validation`` as the held-out streams; the ``fljob_index.json`` of every stream must
match the run's tokenizer and seq_len.

Held-out data is read once, when the trainer is built: :func:`build_validation_batches`
draws the first batches of a fresh loader (epoch 0 of ``data.shuffle_seed``'s order) and
returns them, so every evaluation, and every resumed attempt, sees the same batches and the
training loader is never touched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING

import torch
from torchtitan.components.dataloader import BaseDataLoader

from fljob.errors import UsageError
from fljob.spec.models import DataStream, JobSpec
from fljob.trainer.data.loader import TokenWindowLoader
from fljob.trainer.data.prepare import (
    BUNDLED_VALIDATION_FRACTION,
    sha256_of,
    tokenizer_path,
    tokens_path,
    validation_tokens_path,
)
from fljob.trainer.data.token_file import open_tokens, read_info
from fljob.trainer.data.tokenizer import TokenizerFile

if TYPE_CHECKING:
    from fljob.trainer.data.streaming import StreamingTokenLoader

log = logging.getLogger(__name__)

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]
"""``({"input": ids[B, L]}, labels[B, L])``, what every loader yields."""


def build_tokenizer(spec: JobSpec) -> TokenizerFile:
    return TokenizerFile(tokenizer_path(spec))


def build_dataloader(spec: JobSpec, dp_rank: int, dp_world: int,
                     tokenizer: TokenizerFile) -> BaseDataLoader:
    """This data-parallel rank's loader of ``training.local_batch_size`` x ``seq_len`` batches."""
    if spec.data.streams:
        return build_streaming_dataloader(spec, dp_rank, dp_world, tokenizer)
    return _token_file_loader(spec, dp_rank, dp_world, tokenizer, validation=False)


def build_validation_batches(spec: JobSpec, dp_rank: int, dp_world: int,
                             tokenizer: TokenizerFile) -> list[Batch]:
    """This data-parallel rank's held-out batches: ``training.validation_batches`` of them,
    or as many as one epoch of the held-out data holds (a warning says so)."""
    if spec.data.streams:
        loader = _streaming_loader(spec, dp_rank, dp_world, tokenizer, "data.validation")
        what = "data.validation"
    else:
        loader = _token_file_loader(spec, dp_rank, dp_world, tokenizer, validation=True)
        what = (f"the bundled text's held-out split ({BUNDLED_VALIDATION_FRACTION:.0%} of its "
                "documents)")
    wanted = spec.training.validation_batches
    count = min(wanted, loader.batches_per_epoch)
    if count < wanted and int(os.environ.get("RANK", "0")) == 0:
        log.warning("%s holds %d batches of %d x %d tokens per data-parallel rank (%d ranks), "
                    "fewer than training.validation_batches (%d): each evaluation uses those %d",
                    what, count, spec.training.local_batch_size, spec.training.seq_len, dp_world,
                    wanted, count)
    return list(islice(iter(loader), count))


def _token_file_loader(spec: JobSpec, dp_rank: int, dp_world: int, tokenizer: TokenizerFile,
                       validation: bool) -> TokenWindowLoader:
    """A loader over the bundled text's training or held-out token file."""
    path = validation_tokens_path(spec) if validation else tokens_path(spec)
    info = read_info(path)
    if info is None or info.tokenizer_sha256 != sha256_of(tokenizer.path):
        raise RuntimeError(f"{path} was not prepared with {tokenizer.path}; "
                           "run fljob.trainer.data.prepare first")
    try:
        return TokenWindowLoader(
            open_tokens(path), seq_len=spec.training.seq_len,
            batch_size=spec.training.local_batch_size, dp_rank=dp_rank, dp_world=dp_world,
            seed=spec.data.shuffle_seed)
    except ValueError as exc:  # fewer windows than one step needs
        if not validation:
            raise
        raise UsageError(f"training.validation_interval: the bundled text's held-out split is too "
                         f"small for one evaluation batch: {exc}") from None


def build_streaming_dataloader(spec: JobSpec, dp_rank: int, dp_world: int,
                               tokenizer: TokenizerFile) -> BaseDataLoader:
    """The streaming loader over ``data.streams``, after checking each stream is usable.

    Cleans streaming's shared memory for the held-out streams' caches too: it must happen
    once, before any dataset exists (on an exclusive node streaming's cleaner removes every
    block, live ones included), and the validator's loader is built after this one.
    """
    from fljob.trainer.data.shared_memory import clean_shared_memory

    exclusive = os.environ.get("FLJOB_BACKEND") == "k8s" or (
        os.environ.get("FLJOB_BACKEND") == "slurm" and spec.slurm.exclusive)
    caches = [_cache_dir(spec, "data.streams", i) for i in range(len(spec.data.streams))]
    caches += [_cache_dir(spec, "data.validation", i) for i in range(len(spec.data.validation))]
    clean_shared_memory(caches, exclusive=exclusive)
    return _streaming_loader(spec, dp_rank, dp_world, tokenizer, "data.streams")


def _streaming_loader(spec: JobSpec, dp_rank: int, dp_world: int, tokenizer: TokenizerFile,
                      field: str) -> StreamingTokenLoader:
    """The streaming loader over the streams of ``field`` (data.streams or data.validation);
    the held-out one reads in this process (no workers)."""
    from fljob.trainer.data.streaming import StreamingTokenLoader, StreamSource

    streams = spec.data.streams if field == "data.streams" else spec.data.validation
    _check_streams(spec, streams, field, tokenizer)
    sources = [StreamSource(uri=s.uri, cache_dir=_cache_dir(spec, field, i),
                            proportion=s.proportion) for i, s in enumerate(streams)]
    try:
        return StreamingTokenLoader(
            sources, batch_size=spec.training.local_batch_size, dp_rank=dp_rank,
            dp_world=dp_world, seed=spec.data.shuffle_seed, predownload=spec.data.predownload,
            cache_limit=spec.data.cache_limit,
            num_workers=spec.data.num_workers if field == "data.streams" else 0)
    except ValueError as exc:  # too little data for a step, a cache_limit below a shard, ...
        raise UsageError(f"{field}: {exc}") from None


def _cache_dir(spec: JobSpec, field: str, number: int) -> str:
    """Where stream ``number`` of ``field`` caches its shards (training: ``<root>/<i>``,
    held-out: ``<root>/validation-<i>``; streaming refuses overlapping cache folders)."""
    from fljob.trainer.data.streaming import stream_cache_root

    root = stream_cache_root(spec.resolved_run_dir, spec.data.local_cache,
                             os.environ.get("FLJOB_RUN_ID") or spec.name)
    return str(root / (str(number) if field == "data.streams" else f"validation-{number}"))


def _check_streams(spec: JobSpec, streams: Sequence[DataStream], field: str,
                   tokenizer: TokenizerFile) -> None:
    """Every stream is a complete fljob dataset for this run's seq_len and tokenizer."""
    from fljob.trainer.data.mds_prepare import read_index

    digest = sha256_of(tokenizer.path)
    for number, stream in enumerate(streams):
        index = read_index(stream.uri)
        where = f"{field}[{number}] ({stream.uri})"
        if index is None:
            raise UsageError(f"{where} is not a complete fljob dataset (no fljob_index.json); "
                             "write it with `fljob data prepare SRC DEST`")
        if index.seq_len != spec.training.seq_len:
            raise UsageError(f"{where} holds samples for seq_len {index.seq_len}, the run uses "
                             f"training.seq_len {spec.training.seq_len}; set it to "
                             f"{index.seq_len} or prepare the data again with --seq-len")
        if index.tokenizer_sha256 != digest:
            raise UsageError(f"{where} was tokenized with another tokenizer than {tokenizer.path}; "
                             "use the tokenizer.json stored beside it (leave data.tokenizer unset)")
