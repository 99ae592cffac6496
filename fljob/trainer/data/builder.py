"""Choose the data source from the spec: the one place that knows which loaders exist.

``data.streams`` empty: the bundled text, prepared into a token file in run_dir. Otherwise
MDS streams (local folders or ``s3://``) written by ``fljob data prepare``, read by the
streaming loader; their ``fljob_index.json`` must match the run's tokenizer and seq_len.
"""

from __future__ import annotations

import os

from torchtitan.components.dataloader import BaseDataLoader

from fljob.errors import UsageError
from fljob.spec.models import JobSpec
from fljob.trainer.data.loader import TokenWindowLoader
from fljob.trainer.data.prepare import sha256_of, tokenizer_path, tokens_path
from fljob.trainer.data.token_file import open_tokens, read_info
from fljob.trainer.data.tokenizer import TokenizerFile


def build_tokenizer(spec: JobSpec) -> TokenizerFile:
    return TokenizerFile(tokenizer_path(spec))


def build_dataloader(spec: JobSpec, dp_rank: int, dp_world: int,
                     tokenizer: TokenizerFile) -> BaseDataLoader:
    """This data-parallel rank's loader of ``training.local_batch_size`` x ``seq_len`` batches."""
    if spec.data.streams:
        return build_streaming_dataloader(spec, dp_rank, dp_world, tokenizer)
    path = tokens_path(spec)
    info = read_info(path)
    if info is None or info.tokenizer_sha256 != sha256_of(tokenizer.path):
        raise RuntimeError(f"{path} was not prepared with {tokenizer.path}; "
                           "run fljob.trainer.data.prepare first")
    return TokenWindowLoader(
        open_tokens(path), seq_len=spec.training.seq_len,
        batch_size=spec.training.local_batch_size, dp_rank=dp_rank, dp_world=dp_world,
        seed=spec.data.shuffle_seed)


def build_streaming_dataloader(spec: JobSpec, dp_rank: int, dp_world: int,
                               tokenizer: TokenizerFile) -> BaseDataLoader:
    """The streaming loader over ``data.streams``, after checking each stream is usable."""
    from fljob.trainer.data.mds_prepare import read_index
    from fljob.trainer.data.shared_memory import clean_shared_memory
    from fljob.trainer.data.streaming import StreamingTokenLoader, StreamSource, stream_cache_root

    digest = sha256_of(tokenizer.path)
    for number, stream in enumerate(spec.data.streams):
        index = read_index(stream.uri)
        where = f"data.streams[{number}] ({stream.uri})"
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
    root = stream_cache_root(spec.resolved_run_dir, spec.data.local_cache,
                             os.environ.get("FLJOB_RUN_ID") or spec.name)
    sources = [StreamSource(uri=s.uri, cache_dir=str(root / str(i)), proportion=s.proportion)
               for i, s in enumerate(spec.data.streams)]
    exclusive = os.environ.get("FLJOB_BACKEND") == "k8s" or (
        os.environ.get("FLJOB_BACKEND") == "slurm" and spec.slurm.exclusive)
    clean_shared_memory([s.cache_dir for s in sources], exclusive=exclusive)
    try:
        return StreamingTokenLoader(
            sources, batch_size=spec.training.local_batch_size, dp_rank=dp_rank,
            dp_world=dp_world, seed=spec.data.shuffle_seed, predownload=spec.data.predownload,
            cache_limit=spec.data.cache_limit, num_workers=spec.data.num_workers)
    except ValueError as exc:  # too little data for a step, a cache_limit below a shard, ...
        raise UsageError(f"data.streams: {exc}") from None
