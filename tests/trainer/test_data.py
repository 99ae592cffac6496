"""Bundled-text data: corpus, BPE, the train/held-out split, token files, the stateful
data-parallel loader and the held-out batches."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torchtitan")

import torch

from fljob.errors import UsageError
from fljob.spec.models import JobSpec
from fljob.trainer.data.builder import (
    build_dataloader,
    build_tokenizer,
    build_validation_batches,
)
from fljob.trainer.data.loader import TokenWindowLoader
from fljob.trainer.data.prepare import (
    BUNDLED_VALIDATION_FRACTION,
    prepare_bundled_text,
    tokens_path,
    validation_tokens_path,
)
from fljob.trainer.data.split import held_out, split_documents
from fljob.trainer.data.text import bundled_documents
from fljob.trainer.data.token_file import open_tokens, read_info
from fljob.trainer.data.tokenizer import EOS_TOKEN, train_bpe

VOCAB = 512  # small, so that BPE training stays well under a second


def test_bundled_text_is_real_english_and_ordered() -> None:
    docs = bundled_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    assert docs == bundled_documents()
    assert " the " in docs[0]


def test_bpe_is_deterministic_and_sized() -> None:
    docs = bundled_documents()[:20]
    a, b = train_bpe(docs, VOCAB), train_bpe(docs, VOCAB)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == VOCAB and a.token_to_id(EOS_TOKEN) is not None
    text = "The with statement is used to wrap the execution of a block."
    assert a.decode(a.encode(text).ids) == text


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> JobSpec:
    run_dir = tmp_path_factory.mktemp("run")
    spec = JobSpec.model_validate({"name": "data-test", "run_dir": str(run_dir),
                                   "training": {"seq_len": 32, "local_batch_size": 4}})
    prepare_bundled_text(spec, vocab_size=VOCAB)
    return spec


def test_the_split_is_by_document_disjoint_and_stable() -> None:
    docs = bundled_documents()
    train, validation = split_documents(docs, BUNDLED_VALIDATION_FRACTION)
    assert sorted(train + validation) == sorted(docs) and not set(train) & set(validation)
    reversed_train, reversed_validation = split_documents(docs[::-1], BUNDLED_VALIDATION_FRACTION)
    assert (reversed_train, reversed_validation) == (train[::-1], validation[::-1])  # no order
    # Decided by each document's text alone: a document's side does not depend on the others.
    assert [held_out(d, BUNDLED_VALIDATION_FRACTION) for d in docs] == [d in validation for d in docs]
    # The held-out share of the text is near the fraction, and enough to evaluate on.
    share = sum(map(len, validation)) / sum(map(len, docs))
    assert 0.1 < share < 0.3, share
    # A larger fraction only adds documents to the held-out side (the hash is a threshold).
    assert set(validation) <= set(split_documents(docs, 0.5)[1])
    assert split_documents(docs, 0.0) == (docs, []) and split_documents(docs, 1.0) == ([], docs)


def _decoded_documents(tokenizer, tokens: np.ndarray) -> list[str]:
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]


def test_prepare_writes_the_training_and_the_held_out_documents_apart(prepared: JobSpec) -> None:
    tokenizer = build_tokenizer(prepared)
    train, validation = split_documents(bundled_documents(), BUNDLED_VALIDATION_FRACTION)
    for path, docs in ((tokens_path(prepared), train),
                       (validation_tokens_path(prepared), validation)):
        tokens = open_tokens(path)
        info = read_info(path)
        assert info is not None and info.dtype == "<u2" and len(tokens) == info.num_tokens
        assert tokens.max() < VOCAB
        assert _decoded_documents(tokenizer, tokens) == docs
    # The BPE learned from the training documents only: the same BPE as one trained on them.
    assert tokenizer.tokenizer.to_str() == train_bpe(train, VOCAB).to_str()


def test_prepare_reuses_and_invalidates(prepared: JobSpec) -> None:
    path = tokens_path(prepared)
    before = path.stat().st_mtime_ns, validation_tokens_path(prepared).stat().st_mtime_ns
    prepare_bundled_text(prepared, vocab_size=VOCAB)
    after = path.stat().st_mtime_ns, validation_tokens_path(prepared).stat().st_mtime_ns
    assert after == before  # same tokenizer: reused
    other = prepared.model_copy(update={"run_dir": str(path.parent.parent / "other")})
    prepare_bundled_text(other, vocab_size=VOCAB + 64)
    assert build_tokenizer(other).get_vocab_size() == VOCAB + 64


def loader(tokens: np.ndarray, rank: int, world: int, **kw: int) -> TokenWindowLoader:
    args = {"seq_len": 16, "batch_size": 3, "seed": 7, **kw}
    return TokenWindowLoader(tokens, dp_rank=rank, dp_world=world, **args)


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def test_batches_are_shifted_windows() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    (inputs, labels), = take(iter(loader(tokens, 0, 1)), 1)
    x = inputs["input"]
    assert x.shape == labels.shape == (3, 16) and x.dtype == labels.dtype
    assert (labels[:, :-1] == x[:, 1:]).all() and (labels[:, -1] == x[:, -1] + 1).all()
    assert (x[:, 0] % 16 == 0).all()  # windows start on seq_len boundaries


def test_ranks_split_each_step_without_overlap() -> None:
    tokens = np.arange(2000, dtype=np.uint16)
    single = [b[0]["input"] for b in take(iter(loader(tokens, 0, 1, batch_size=6)), 4)]
    parts = [[b[0]["input"] for b in take(iter(loader(tokens, r, 2)), 4)] for r in (0, 1)]
    for step in range(4):
        both = np.concatenate([parts[0][step].numpy(), parts[1][step].numpy()])
        assert (both == single[step].numpy()).all()  # same global batch, split by rank


def test_state_dict_resumes_exactly_and_reshards() -> None:
    tokens = np.arange(3000, dtype=np.uint16)
    run = loader(tokens, 1, 2)
    it = iter(run)
    take(it, 5)
    state = run.state_dict()
    expected = take(it, 3)
    resumed = loader(tokens, 1, 2)
    resumed.load_state_dict(state)
    for (a, la), (b, lb) in zip(expected, take(iter(resumed), 3), strict=True):
        assert (a["input"] == b["input"]).all() and (la == lb).all()
    # One rank taking the global batch continues where the two ranks stopped together:
    # the second half of its next batch is what rank 1 would have had.
    alone = loader(tokens, 0, 1, batch_size=6)
    alone.load_state_dict(state)
    (next_global, _), = take(iter(alone), 1)
    assert (next_global["input"][3:] == expected[0][0]["input"]).all()


def test_epochs_roll_over_with_a_new_order() -> None:
    tokens = np.arange(16 * 10 + 1, dtype=np.uint16)  # 10 windows, 3 per step: 3 steps/epoch
    run = loader(tokens, 0, 1)
    it = iter(run)
    first_epoch = np.concatenate([b[0]["input"][:, 0].numpy() for b in take(it, 3)])
    assert run.state_dict() == {"epoch": 0, "consumed": 9}
    second = take(it, 1)[0][0]["input"][:, 0].numpy()
    assert run.state_dict() == {"epoch": 1, "consumed": 3}
    assert len(set(first_epoch)) == 9 and not np.array_equal(first_epoch[:3], second)


def test_too_little_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="fewer than one step needs"):
        loader(np.arange(100, dtype=np.uint16), 0, 4)


def test_builder_uses_the_prepared_file_or_refuses_an_unprepared_stream(
        prepared: JobSpec, tmp_path) -> None:
    tokenizer = build_tokenizer(prepared)
    dl = build_dataloader(prepared, 0, 1, tokenizer)
    (inputs, _labels), = take(iter(dl), 1)
    assert inputs["input"].shape == (4, 32)
    streaming = JobSpec.model_validate({**prepared.model_dump(),
                                        "data": {"streams": [{"uri": str(tmp_path)}]}})
    with pytest.raises(UsageError, match="fljob data prepare"):  # streams: tests/trainer/test_streaming.py
        build_dataloader(streaming, 0, 1, tokenizer)


def test_held_out_batches_are_the_same_every_time_and_never_training_text(
        prepared: JobSpec, caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = build_tokenizer(prepared)
    spec = prepared.model_copy(update={"training": prepared.training.model_copy(
        update={"validation_batches": 3})})
    first = build_validation_batches(spec, 0, 2, tokenizer)
    again = build_validation_batches(spec, 0, 2, tokenizer)
    other_rank = build_validation_batches(spec, 1, 2, tokenizer)
    assert len(first) == 3 and first[0][0]["input"].shape == (4, 32)
    for (a, la), (b, lb) in zip(first, again, strict=True):
        assert torch.equal(a["input"], b["input"]) and torch.equal(la, lb)
    rows = {tuple(x.tolist()) for inputs, _ in first for x in inputs["input"]}
    assert not rows & {tuple(x.tolist()) for inputs, _ in other_rank for x in inputs["input"]}
    # Every window comes from the held-out token file, none from the training one.
    held = open_tokens(validation_tokens_path(prepared))
    windows = {tuple(held[i * 32:i * 32 + 32].tolist()) for i in range((len(held) - 1) // 32)}
    assert rows <= windows
    # More batches than the split holds: each evaluation uses those there are, and says so.
    spec.training.validation_batches = 10_000
    capped = build_validation_batches(spec, 0, 1, tokenizer)
    assert len(capped) == (len(held) - 1) // 32 // 4
    assert "fewer than training.validation_batches (10000)" in caplog.text
    spec.training.local_batch_size = 10_000
    with pytest.raises(UsageError, match="held-out split is too small"):
        build_validation_batches(spec, 0, 1, tokenizer)
