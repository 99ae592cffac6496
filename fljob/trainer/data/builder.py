"""Choose the data source from the spec: the one place that knows which loaders exist.

Today that is the bundled text (``data.streams`` empty); MDS streams from object storage
plug in here as a second branch with the same signature.
"""

from __future__ import annotations

from torchtitan.components.dataloader import BaseDataLoader

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
        raise NotImplementedError("data.streams (MDS streaming) is not implemented yet; "
                                  "leave it empty to train on the bundled text")
    path = tokens_path(spec)
    info = read_info(path)
    if info is None or info.tokenizer_sha256 != sha256_of(tokenizer.path):
        raise RuntimeError(f"{path} was not prepared with {tokenizer.path}; "
                           "run fljob.trainer.data.prepare first")
    return TokenWindowLoader(
        open_tokens(path), seq_len=spec.training.seq_len,
        batch_size=spec.training.local_batch_size, dp_rank=dp_rank, dp_world=dp_world,
        seed=spec.data.shuffle_seed)
