"""MDS preparation and the streaming loader: exact tokens, proportions, DP/TP sharding, resume,
shared-memory hygiene, the train/validation split and held-out streams, and `fljob data
prepare`'s answers to bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ports import free_port

pytest.importorskip("torchtitan")

import torch.multiprocessing as mp

from fljob.trainer.data.streaming_compat import import_streaming

try:
    import_streaming()
except ImportError as exc:
    pytest.skip(f"mosaicml-streaming is not importable: {exc}", allow_module_level=True)

from fljob.errors import UsageError
from fljob.spec.models import JobSpec
from fljob.summary import read_summary
from fljob.trainer.data.builder import build_validation_batches
from fljob.trainer.data.mds_prepare import (
    INDEX_FILE,
    TOKENIZER_FILE,
    PrepareConfig,
    iter_documents,
    prepare_mds,
    prepare_split,
    read_index,
)
from fljob.trainer.data.shared_memory import registered_locals, release_leaked
from fljob.trainer.data.split import held_out
from fljob.trainer.data.streaming import (
    StreamingTokenLoader,
    StreamSource,
    replication_for,
)
from fljob.trainer.data.tokenizer import TokenizerFile
from fljob.trainer.process_group import end_process_group

REPO = Path(__file__).resolve().parents[2]
SEQ = 16
VOCAB = 300


def _corpus(folder: Path, topic: str, docs: int) -> Path:
    """A folder of real-looking text: plain files and a JSONL file, with distinct words."""
    folder.mkdir(parents=True)
    for i in range(docs):
        (folder / f"{topic}-{i:02d}.txt").write_text(
            f"{topic} note {i}: " + " ".join(f"{topic} {i * 40 + k}" for k in range(40)))
    with open(folder / f"{topic}.jsonl", "w") as handle:
        for i in range(docs):
            text = " ".join(f"record {i * 10 + k}" for k in range(10))
            handle.write(json.dumps({"text": text, "id": i}) + "\n")
    return folder


def _prepare(tmp: Path, topic: str, docs: int = 12, **kwargs) -> Path:
    dest = tmp / f"mds-{topic}"
    config = PrepareConfig(src=str(_corpus(tmp / f"src-{topic}", topic, docs)), dest=str(dest),
                           seq_len=SEQ, vocab_size=VOCAB, **kwargs)
    prepare_mds(config, progress=False)
    return dest


def _expected_samples(src: Path, dest: Path) -> list[tuple[int, ...]]:
    """The samples a correct preparation makes, computed independently of the packer."""
    tokenizer = TokenizerFile(dest / TOKENIZER_FILE)
    stream: list[int] = []
    for text, _ in iter_documents(str(src)):
        stream += tokenizer.encode(text) + [tokenizer.eos_id]
    n = (len(stream) - 1) // SEQ
    return [tuple(stream[i * SEQ:i * SEQ + SEQ + 1]) for i in range(n)]


def _loader(sources: list[StreamSource], batch: int = 4, seed: int = 7, dp_rank: int = 0,
            dp_world: int = 1) -> StreamingTokenLoader:
    return StreamingTokenLoader(sources, batch_size=batch, dp_rank=dp_rank, dp_world=dp_world,
                                seed=seed)


def _rows(batch) -> list[tuple[int, ...]]:
    """A batch back to whole samples: input plus the last label."""
    inputs, labels = batch
    assert inputs["input"].dtype.is_floating_point is False
    assert (inputs["input"][:, 1:] == labels[:, :-1]).all()  # labels are inputs shifted by one
    full = np.concatenate([inputs["input"].numpy(), labels[:, -1:].numpy()], axis=1)
    return [tuple(int(x) for x in row) for row in full]


def _take(loader: StreamingTokenLoader, batches: int, it=None) -> list[tuple[int, ...]]:
    it = iter(loader) if it is None else it
    return [row for _ in range(batches) for row in _rows(next(it))]


@pytest.fixture(autouse=True)
def _single_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                        ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)


def test_prepare_then_loader_reads_exactly_the_packed_tokens(tmp_path: Path) -> None:
    dest = _prepare(tmp_path, "alpha")
    expected = _expected_samples(tmp_path / "src-alpha", dest)
    index = read_index(str(dest))
    assert index is not None and index.samples == len(expected) and index.seq_len == SEQ
    assert index.documents == 24
    assert index.vocab_size == TokenizerFile(dest / TOKENIZER_FILE).get_vocab_size() <= VOCAB
    assert (dest / "index.json").exists() and any(dest.glob("shard.*.mds.zstd"))

    loader = _loader([StreamSource(str(dest), str(tmp_path / "cache"))], batch=4)
    got = _take(loader, len(expected) // 4)  # one epoch, the ragged last batch dropped
    assert len(set(expected)) == len(expected)  # the corpus has no repeated window
    assert len(set(got)) == len(got)  # no sample twice within an epoch
    assert set(got) <= set(expected) and len(expected) - len(got) < 4
    assert got != expected[:len(got)]  # shuffled


def test_proportions_weight_the_streams(tmp_path: Path) -> None:
    a, b = _prepare(tmp_path, "alpha"), _prepare(tmp_path, "beta")
    in_a = set(_expected_samples(tmp_path / "src-alpha", a))
    in_b = set(_expected_samples(tmp_path / "src-beta", b))
    assert not in_a & in_b
    loader = _loader([StreamSource(str(a), str(tmp_path / "ca"), proportion=3.0),
                      StreamSource(str(b), str(tmp_path / "cb"), proportion=1.0)], batch=2)
    epoch = loader.dataset.epoch_size
    rows = _take(loader, epoch // 2)
    counts = Counter("a" if r in in_a else "b" if r in in_b else "?" for r in rows)
    assert counts["?"] == 0
    assert abs(counts["a"] - 0.75 * len(rows)) <= 2 and abs(counts["b"] - 0.25 * len(rows)) <= 2


def test_resume_from_state_dict_continues_with_the_same_batches(tmp_path: Path) -> None:
    dest = _prepare(tmp_path, "alpha")
    source = [StreamSource(str(dest), str(tmp_path / "c1"))]
    first = _loader(source, batch=3)
    epoch_batches = first.dataset.epoch_size // 3
    it = iter(first)
    _take(first, epoch_batches - 2, it)  # stop two batches before the epoch ends
    state = first.state_dict()
    assert state["epoch"] == 0 and state["sample_in_epoch"] == (epoch_batches - 2) * 3
    continuation = _take(first, 5, it)  # crosses into the next epoch

    resumed = _loader([StreamSource(str(dest), str(tmp_path / "c2"))], batch=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
    assert _take(resumed, 5) == continuation

    fresh = _loader([StreamSource(str(dest), str(tmp_path / "c3"))], batch=3)
    assert _take(fresh, 5) != continuation  # the state is what made the difference


def test_split_writes_two_complete_datasets_of_disjoint_whole_documents(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "src", "alpha", 30)
    config = PrepareConfig(src=str(src), dest=str(tmp_path / "out"), seq_len=SEQ, vocab_size=VOCAB)
    written = prepare_split(config, 0.25, progress=False)
    train, validation = tmp_path / "out" / "train", tmp_path / "out" / "validation"
    assert list(written) == [str(train), str(validation)]
    assert written[str(train)] == read_index(str(train))
    assert written[str(validation)] == read_index(str(validation))
    docs = [text for text, _ in iter_documents(str(src))]
    held = [d for d in docs if held_out(d, 0.25)]
    assert 0 < len(held) < len(docs) / 2
    assert read_index(str(validation)).documents == len(held)
    assert read_index(str(train)).documents == len(docs) - len(held)
    assert (train / TOKENIZER_FILE).read_bytes() == (validation / TOKENIZER_FILE).read_bytes()
    # Each side holds exactly its own documents' tokens, in order: no document is cut in two.
    tokenizer = TokenizerFile(train / TOKENIZER_FILE)
    for folder, mine in ((train, [d for d in docs if d not in held]), (validation, held)):
        stream = [t for d in mine for t in tokenizer.encode(d) + [tokenizer.eos_id]]
        n = (len(stream) - 1) // SEQ
        expected = {tuple(stream[i * SEQ:i * SEQ + SEQ + 1]) for i in range(n)}
        loader = _loader([StreamSource(str(folder), str(tmp_path / f"cache-{folder.name}"))], batch=1)
        assert set(_take(loader, n)) == expected
    # The same input splits the same way again.
    again = prepare_split(PrepareConfig(src=str(src), dest=str(tmp_path / "again"), seq_len=SEQ,
                                        vocab_size=VOCAB), 0.25, progress=False)
    assert [i.tokens for i in again.values()] == [i.tokens for i in written.values()]
    with pytest.raises(UsageError, match="between 0 and 1"):
        prepare_split(config, 1.0, progress=False)


def test_held_out_stream_batches_are_fixed_and_checked(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "src", "alpha", 40)
    prepare_split(PrepareConfig(src=str(src), dest=str(tmp_path / "d"), seq_len=SEQ,
                                vocab_size=VOCAB), 0.3, progress=False)
    train, validation = str(tmp_path / "d" / "train"), str(tmp_path / "d" / "validation")

    def spec(uri: str, **training: int) -> JobSpec:
        return JobSpec.model_validate({
            "name": "held", "run_dir": str(tmp_path / "run"),
            "training": {"seq_len": SEQ, "local_batch_size": 2, "validation_interval": 5,
                         "validation_batches": 2, **training},
            "data": {"streams": [{"uri": train}], "validation": [{"uri": uri}]}})

    tokenizer = TokenizerFile(tmp_path / "d" / "train" / TOKENIZER_FILE)
    first = build_validation_batches(spec(validation), 0, 1, tokenizer)
    again = build_validation_batches(spec(validation), 0, 1, tokenizer)
    assert len(first) == 2 and [_rows(b) for b in first] == [_rows(b) for b in again]
    held_samples = set(_take(_loader([StreamSource(validation, str(tmp_path / "all"))], batch=1),
                             read_index(validation).samples))
    assert {row for b in first for row in _rows(b)} <= held_samples
    with pytest.raises(UsageError, match=r"data\.validation\[0\] .* seq_len"):
        build_validation_batches(spec(validation, seq_len=2 * SEQ), 0, 1, tokenizer)
    with pytest.raises(UsageError, match=r"data\.validation\[0\] .* not a complete"):
        build_validation_batches(spec(str(tmp_path / "src")), 0, 1, tokenizer)


def _shard_worker(rank: int, world: int, port: int, dest: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tp = 2
    loader = _loader([StreamSource(dest, cache)], batch=2, dp_rank=rank // tp,
                     dp_world=world // tp)
    rows = _take(loader, 4)
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    end_process_group()


@pytest.mark.slow
def test_two_dp_ranks_disjoint_and_tp_peers_identical(tmp_path: Path) -> None:
    """World 4 = 2 data-parallel ranks x TP 2, as torchtitan lays out its mesh."""
    dest = _prepare(tmp_path, "alpha", docs=30)
    mp.spawn(_shard_worker, args=(4, free_port(), str(dest), str(tmp_path / "cache"),
                                  str(tmp_path)), nprocs=4, join=True)
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert rows[0] == rows[1] and rows[2] == rows[3]  # TP peers see the same samples
    assert not {tuple(r) for r in rows[0]} & {tuple(r) for r in rows[2]}  # DP ranks do not
    assert len(rows[0]) == 8


def test_replication_refuses_a_mesh_without_tp_innermost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    assert replication_for(dp_rank=0, dp_world=2) == 2
    with pytest.raises(RuntimeError, match="innermost"):
        replication_for(dp_rank=1, dp_world=2)  # rank 1 would be DP rank 1 if TP were outermost


def test_leaked_shared_memory_of_this_job_is_released(tmp_path: Path) -> None:
    """A crashed run's registration blocks the restart; the job-scoped clean removes only it."""
    from multiprocessing import shared_memory
    from tempfile import gettempdir

    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
    from streaming.base.shared.prefix import _get_path, _pack_locals

    dest = _prepare(tmp_path, "alpha")
    ours, theirs = str(tmp_path / "cache-ours"), str(tmp_path / "cache-theirs")
    # Streaming walks prefixes from 0, skipping those with file locks in the temp folder, and
    # stops at the first without a block: a leak there (after a container restart, which
    # empties /tmp but not the pod's /dev/shm) claims the restarted run's cache folder.
    taken = set(registered_locals())
    free = [p for p in range(10000) if p not in taken
            and not any(Path(gettempdir(), _get_path(p, lock)).exists()
                        for lock in (BARRIER_FILELOCK, CACHE_FILELOCK))][:2]
    blocks = []
    for prefix, local in zip(free, (ours, theirs), strict=True):
        data = _pack_locals([local], prefix)
        block = shared_memory.SharedMemory(_get_path(prefix, "locals"), create=True, size=len(data))
        block.buf[:len(data)] = data
        blocks.append(block)
    try:
        with pytest.raises(ValueError, match="Reused local directory"):
            _loader([StreamSource(str(dest), ours)])
        assert release_leaked([ours]) == [free[0]]
        assert free[0] not in registered_locals() and registered_locals()[free[1]] == [theirs]
        assert len(_take(_loader([StreamSource(str(dest), ours)]), 1)) == 4
    finally:
        for block in blocks:
            block.close()
            try:
                block.unlink()
            except FileNotFoundError:
                pass


# Six single-rank jobs and three two-rank jobs: the trials of a packed sweep, and a multi-GPU
# run that shares the host with them. Without the registration lock 1-4 of 12 processes
# started this way failed with FileExistsError on this 2-core machine in every run.
STARTING_JOBS = (1, 1, 1, 1, 1, 1, 2, 2, 2)


def _registering_worker(job: int, rank: int, world: int, port: int, dest: str, cache: str,
                        start, results) -> None:
    """One rank of one job: build a loader the moment every process is ready, draw a batch."""
    from datetime import timedelta

    import torch.distributed as dist

    from fljob.trainer.data.shared_memory import host_lock, release_prefix

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:  # a leader that fails must not leave its peer at streaming's barrier for long
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    start.wait()
    loader = None
    try:
        loader = _loader([StreamSource(dest, f"{cache}/{job}")], batch=2, dp_rank=rank,
                         dp_world=world)
        next(iter(loader))
        results.put((job, rank, "ok"))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which names it
        results.put((job, rank, f"{type(exc).__name__}: {exc}"))
    if world > 1:
        end_process_group(all_ranks_here=loader is not None)
    if loader is not None and rank == 0:  # forkserver children skip atexit, streaming's cleaner
        with host_lock():  # as fljob frees a prefix: never while another job's ranks walk them
            release_prefix(loader.dataset._shm_prefix_int)


def _forkserver():
    """Children forked from one process that imported torch, torchtitan and streaming once:
    a dozen spawned interpreters would spend half a minute importing them on two cores. (The
    server does not get the test's sys.path, so it preloads what this module imports.)"""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["pytest", "fljob.trainer.data.builder",
                                    "fljob.trainer.data.streaming"])
    return context


@pytest.mark.slow
def test_jobs_starting_together_each_register_their_datasets(tmp_path: Path) -> None:
    """Streaming picks the lowest free shared-memory prefix, then creates it: two jobs starting
    in the same instant picked the same one and one failed. The host-wide registration lock
    gives each its own."""
    dest = _prepare(tmp_path, "alpha")
    context = _forkserver()
    ranks = [(job, rank, world) for job, world in enumerate(STARTING_JOBS) for rank in range(world)]
    start, results = context.Barrier(len(ranks)), context.Queue()
    ports = [free_port() for _ in STARTING_JOBS]
    processes = [context.Process(target=_registering_worker, args=(
        job, rank, world, ports[job], str(dest), str(tmp_path / "cache"), start, results))
        for job, rank, world in ranks]
    try:
        for process in processes:
            process.start()
        outcomes = sorted(results.get(timeout=240) for _ in processes)
        for process in processes:
            process.join(timeout=60)
    finally:
        _stop(processes)
    failed = [outcome for outcome in outcomes if outcome[2] != "ok"]
    assert not failed, f"{len(failed)} of {len(ranks)} ranks failed to start: {failed[:3]}"
    assert [process.exitcode for process in processes] == [0] * len(ranks)


def _stop(processes) -> None:
    """Kill what a failed test left running, so no rank outlives it."""
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def _two_host_worker(rank: int, port: int, lock_dirs: list[str], marks: str) -> None:
    """Rank ``rank`` of a job on two hosts: each rank leads its own, with its own lock file."""
    import tempfile

    import torch.distributed as dist

    from fljob.trainer.data.shared_memory import registration_lock

    tempfile.tempdir = lock_dirs[rank]
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    Path(marks, f"started-{rank}").touch()
    with registration_lock():
        Path(marks, f"registered-{rank}").touch()
    end_process_group()


@pytest.mark.slow
def test_a_multi_host_job_never_sits_on_one_host_lock_waiting_for_another(tmp_path: Path) -> None:
    """Two multi-node jobs sharing hosts A and B would deadlock if each held one host's lock
    and waited for the other's. While another job holds B, this job's leader on A must keep
    letting A go, and it registers as soon as both are free."""
    import fcntl

    from fljob.files import open_lock_file
    from fljob.trainer.data.shared_memory import REGISTRATION_LOCK

    lock_dirs = [tmp_path / "host-a", tmp_path / "host-b"]
    marks = tmp_path / "marks"
    for folder in (*lock_dirs, marks):
        folder.mkdir()
    a, b = (open_lock_file(d / REGISTRATION_LOCK) for d in lock_dirs)
    port, context = free_port(), _forkserver()
    job = [context.Process(target=_two_host_worker,
                           args=(rank, port, list(map(str, lock_dirs)), str(marks)))
           for rank in range(2)]
    try:
        fcntl.flock(b, fcntl.LOCK_EX)  # another job is registering on host B
        for process in job:
            process.start()
        deadline = time.monotonic() + 120
        while len(list(marks.glob("started-*"))) < 2:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.1)
        time.sleep(1.0)  # the job is trying: its leader on A takes A, sees B missing, ...
        deadline = time.monotonic() + 10
        while not _try_flock(a):  # ... and lets A go again (the test takes it in a gap)
            assert time.monotonic() < deadline, "the leader on host A kept its lock"
            time.sleep(0.005)
        assert not list(marks.glob("registered-*"))  # nobody registered without both hosts
        fcntl.flock(a, fcntl.LOCK_UN)
        fcntl.flock(b, fcntl.LOCK_UN)
        for process in job:
            process.join(timeout=60)
        assert [process.exitcode for process in job] == [0, 0]
        assert sorted(p.name for p in marks.glob("registered-*")) == ["registered-0",
                                                                     "registered-1"]
    finally:
        _stop(job)
        os.close(a)
        os.close(b)


def _try_flock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# ------------------------------------------------------------------ fljob data prepare CLI


def fljob(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fljob.cli", *args], capture_output=True,
                          text=True, check=False, timeout=300,
                          env={**_outside_torchrun(), "PYTHONPATH": str(REPO), **(env or {})})


def _outside_torchrun() -> dict[str, str]:
    """This environment without the rank variables the single-rank fixture sets."""
    ranks = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in ranks}


@pytest.mark.slow
def test_cli_splits_with_a_validation_fraction_and_names_both_uris(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    result = fljob("data", "prepare", "builtin:pydoc", str(dest), "--seq-len", "64",
                   "--vocab-size", str(VOCAB), "--validation-fraction", "0.2", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"data: {{streams: [{{uri: {dest / 'train'}}}], validation: [{{uri: " \
           f"{dest / 'validation'}}}]}}" in result.stdout
    for split in ("train", "validation"):
        index = json.loads((dest / split / INDEX_FILE).read_text())
        assert f"{split} split at validation fraction 0.2" in index["source"]
        assert f"{dest / split}: {index['documents']} documents" in result.stdout
    bad = fljob("data", "prepare", "builtin:pydoc", str(tmp_path / "bad"),
                "--validation-fraction", "0", "--no-progress")
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cli_prepares_the_bundled_corpus(tmp_path: Path) -> None:
    result = fljob("data", "prepare", "builtin:pydoc", str(tmp_path / "out"), "--seq-len", "64",
                   "--no-progress")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert index["source"].startswith("pydoc_data.topics") and index["samples"] > 1000
    assert index["tokens"] >= index["samples"] * 64


@pytest.mark.parametrize("case", ["missing-src", "bad-jsonl", "dest-not-empty", "no-endpoint"])
def test_cli_bad_input_exits_2_without_a_complete_dataset(tmp_path: Path, case: str) -> None:
    dest = tmp_path / "out"
    src = _corpus(tmp_path / "src", "alpha", 3)
    env = {}
    if case == "missing-src":
        args, needle = [str(tmp_path / "nope"), str(dest)], "does not exist"
    elif case == "bad-jsonl":  # 300 good records (a batch is written) then a broken one
        lines = [json.dumps({"text": f"record {i} " * 20}) for i in range(300)] + ["{oops"]
        (src / "zz.jsonl").write_text("\n".join(lines) + "\n")
        args, needle = [str(src), str(dest)], "zz.jsonl:301"
    elif case == "dest-not-empty":
        dest.mkdir()
        (dest / "keep.txt").write_text("mine")
        args, needle = [str(src), str(dest)], "--overwrite"
    else:
        args, needle = [str(src), "s3://bucket/x", "--endpoint-url",
                        f"http://127.0.0.1:{free_port()}"], "cannot reach the S3 endpoint"
        env = {"AWS_ACCESS_KEY_ID": "fljob-test-id", "AWS_SECRET_ACCESS_KEY": "fljob-test-secret"}
    result = fljob("data", "prepare", *args, "--seq-len", str(SEQ), "--vocab-size", str(VOCAB),
                   "--no-progress", env=env)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert "fljob-test-secret" not in result.stderr + result.stdout
    assert not (dest / INDEX_FILE).exists() and not (dest / "index.json").exists()
    if case == "dest-not-empty":
        assert (dest / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------ the trainer on a stream


def _stream_spec(tmp: Path, uri: str, seq_len: int = SEQ, batch: int = 2) -> Path:
    spec = tmp / "spec.yaml"
    spec.write_text(json.dumps({
        "name": "stream-test", "run_dir": str(tmp / "run"),
        "training": {"steps": 3, "local_batch_size": batch, "seq_len": seq_len},
        "data": {"streams": [{"uri": uri}]},
        "metrics": {"enabled": False, "port": free_port()},
    }))
    return spec


@pytest.mark.slow
def test_fljob_train_reads_a_local_stream(tmp_path: Path) -> None:
    dest = _prepare(tmp_path, "alpha")
    result = fljob("train", str(_stream_spec(tmp_path, str(dest))))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    # The run trained with the tokenizer stored beside the stream, fetched into its run_dir.
    fetched = tmp_path / "run" / "data" / TOKENIZER_FILE
    assert fetched.read_bytes() == (dest / TOKENIZER_FILE).read_bytes()
    assert any((tmp_path / "run" / "data" / "mds-cache" / "0").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["seq-len", "too-small", "unprepared"])
def test_fljob_train_refuses_an_unusable_stream(tmp_path: Path, case: str) -> None:
    dest = _prepare(tmp_path, "alpha")
    if case == "seq-len":
        spec, needle = _stream_spec(tmp_path, str(dest), seq_len=2 * SEQ), f"seq_len {SEQ}"
    elif case == "too-small":
        spec, needle = _stream_spec(tmp_path, str(dest), batch=500), "fewer than one step needs"
    else:
        (dest / INDEX_FILE).unlink()  # as after a preparation that failed half-way
        spec, needle = _stream_spec(tmp_path, str(dest)), "not a complete fljob dataset"
    result = fljob("train", str(spec))
    assert result.returncode == 2, result.stderr[-3000:]
    assert needle in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_the_stream_bitwise(tmp_path: Path) -> None:
    """2 data-parallel ranks with held-out streams: 6 steps in one go == 3 steps, stop, resume
    for 3 more, the training steps and the evaluations both.

    The learning rate is constant (a decay of 1% of the steps rounds to none), so only the
    restored model, optimizer and sample position can make steps 4-6 equal; the evaluations
    at steps 2, 4 and 6 are equal because every attempt draws the same held-out batches.
    """
    src = _corpus(tmp_path / "src", "alpha", 40)
    prepare_split(PrepareConfig(src=str(src), dest=str(tmp_path / "d"), seq_len=SEQ,
                                vocab_size=VOCAB), 0.3, progress=False)

    def run(run_dir: Path, steps: int) -> tuple[list[tuple[int, float]], dict[int, float]]:
        spec = tmp_path / f"{run_dir.name}.yaml"
        spec.write_text(json.dumps({
            "name": "stream-resume", "run_dir": str(run_dir),
            "resources": {"procs_per_node": 2},
            "training": {"steps": steps, "local_batch_size": 2, "seq_len": SEQ,
                         "validation_interval": 2, "validation_batches": 2},
            "schedule": {"decay_ratio": 0.01},
            "data": {"streams": [{"uri": str(tmp_path / "d" / "train")}],
                     "validation": [{"uri": str(tmp_path / "d" / "validation")}]},
            "metrics": {"enabled": False, "port": free_port()},
        }))
        result = fljob("submit", "--backend", "local", str(spec))
        assert result.returncode == 0, result.stderr[-3000:]
        rows = list(map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()))
        return ([(r["step"], r["loss"]) for r in rows if "loss" in r],
                {r["step"]: r["validation_loss"] for r in rows if "validation_loss" in r})

    straight, straight_held = run(tmp_path / "straight", 6)
    _, first_held = run(tmp_path / "stopped", 3)
    first = read_summary(tmp_path / "stopped")
    stopped_and_resumed, held = run(tmp_path / "stopped", 6)  # the metrics file is appended to
    assert [step for step, _ in stopped_and_resumed] == [1, 2, 3, 4, 5, 6]  # resumed at 4
    assert stopped_and_resumed == straight
    assert sorted(first_held) == [2, 3] and sorted(held) == [2, 3, 4, 6]  # 3: the first's last
    assert {s: held[s] for s in (2, 4, 6)} == straight_held
    # The resumed attempt's summary carries on from the first one's.
    summary = read_summary(tmp_path / "stopped")
    assert first is not None and summary is not None
    assert (summary.state, summary.step, summary.validation_step) == ("completed", 6, 6)
    assert summary.validation_loss == straight_held[6]
    assert summary.elapsed_s > first.elapsed_s
