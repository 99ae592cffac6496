"""Bad input and unwritable outputs of `fljob data prepare`, `fljob dashboard` and `fljob mup
coord-check`, through the real CLI: one line naming what is wrong, exit 2 (1 for a write that
fails mid-way), no traceback, and nothing left behind: no dataset that looks complete, no
half-written file, no folder.

Read-only and full disks are real tmpfs mounts (tests/test_writes.py's fixture: skipped,
saying why, where mounting is not permitted). The `data prepare` cases run at once in two
module fixtures, each test reading its own result: those refused before streaming and torch
are imported (a fraction of a second each), and the slow ones that import them and tokenize
(seconds each; marked slow, so that `make test-fast` skips them and their fixture).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_writes import fljob, one_line_error
from test_writes import tmpfs as tmpfs  # noqa: PLC0414  (the real-tmpfs fixture, by its name)

SMALL = ("--seq-len", "16", "--vocab-size", "300", "--no-progress")
"""Options that keep a preparation fast: a short sample, a small BPE."""
INDEX = "fljob_index.json"
GOOD = {f"doc-{i:02d}.txt": (f"note {i}: " + " ".join(f"word {i * 40 + k}" for k in range(40))).encode()
        for i in range(12)}
"""A corpus that prepares: twelve text files of distinct words."""
LATE_BAD = b"".join(json.dumps({"text": f"record {i} " * 20}).encode() + b"\n"
                   for i in range(300)) + b"[1]\n"
"""JSONL whose last record is bad: read after shards are written (--tokenizer: no BPE pass)."""


@dataclass(frozen=True)
class Case:
    """One `fljob data prepare` run: its SRC files (None: GOOD), what DEST is before it
    (new, a file, below a file, or a copy of a dataset folder with some change), its options
    (``{tokenizer}``: the dataset folder's tokenizer.json) and the words its error line must
    hold."""

    words: tuple[str, ...]
    options: tuple[str, ...] = ()
    src: dict[str, bytes] | None = None
    dest: str = "new"  # new | file | below-file | other-file | dataset | partial
    exit_code: int = 2
    small: tuple[str, ...] = SMALL


REFUSED_EARLY = {
    # option values
    "seq-len-zero": Case(("--seq-len 0", "at least 8"), ("--seq-len", "0")),
    "seq-len-negative": Case(("--seq-len -5", "at least 8"), ("--seq-len", "-5")),
    "seq-len-not-a-number": Case(("--seq-len", "invalid int value: 'x'"), ("--seq-len", "x")),
    "vocab-below-the-bytes": Case(("--vocab-size 100", "at least 257"), ("--vocab-size", "100")),
    "vocab-with-a-tokenizer": Case(("--vocab-size", "--tokenizer", "leave one of them out"),
                                   ("--tokenizer", "{tokenizer}", "--vocab-size", "500"),
                                   small=("--no-progress",)),
    "fraction-outside": Case(("--validation-fraction 1.5", "between 0 and 1"),
                             ("--validation-fraction", "1.5")),
    "fraction-not-a-number": Case(("--validation-fraction", "invalid float value: 'half'"),
                                  ("--validation-fraction", "half")),
    "text-field-without-jsonl": Case(("--text-field 'body'", "no .jsonl/.ndjson files"),
                                     ("--text-field", "body")),
    # DEST
    "dest-is-a-file": Case(("is a file",), dest="file"),
    "dest-below-a-file": Case(("a part of the path is a file",), dest="below-file"),
    "dest-holds-other-files": Case(("holds keep.txt, which fljob data prepare did not write",),
                                   ("--overwrite",), dest="other-file"),
    "dest-holds-a-dataset": Case(("holds a prepared dataset", "--overwrite"), dest="dataset"),
    "dest-holds-a-partial-dataset": Case((f"holds a partial dataset (no {INDEX}", "--overwrite"),
                                         dest="partial"),
}
"""Cases refused before streaming and torch are imported (a fraction of a second each): DEST
is checked by the names in it, so a dataset's file names with no real content will do."""

REFUSED_LATE = {
    # option values that need streaming to read, or the tokenizer to check
    "shard-size-not-a-size": Case(("--shard-size 'banana'", "64mb, 1gb or 512kb"),
                                  ("--shard-size", "banana")),
    "shard-size-4gb": Case(("--shard-size '4gb'", "below 4gb"), ("--shard-size", "4gb")),
    "seq-len-beyond-a-shard": Case(("--seq-len 100000", "larger than --shard-size 64kb"),
                                   ("--seq-len", "100000", "--shard-size", "64kb")),
    # input that is not text, or no text
    "latin-1": Case(("zz.txt is not UTF-8 text", "0xe9"),
                    src={**GOOD, "zz.txt": "café".encode("latin-1")}),
    "nul-bytes": Case(("zz.txt holds NUL characters",), src={**GOOD, "zz.txt": b"\0" * 4096}),
    "utf-16": Case(("zz.txt holds NUL characters", "UTF-16"),
                   src={**GOOD, "zz.txt": "plain words".encode("utf-16-le")}),
    "control-characters": Case(("zz.txt is 67% control characters",),
                               src={**GOOD, "zz.txt": b"ab\x01\x02\x03\x04" * 500}),
    "jsonl-array": Case(("a.jsonl:2 is a JSON array, not an object",),
                        src={"a.jsonl": b'{"text": "ok"}\n[1, 2]\n'}),
    "jsonl-not-json": Case(("a.jsonl:1 is not JSON",), src={"a.jsonl": b'{"text": \n'}),
    "jsonl-without-the-field": Case(("a.jsonl:1 has no 'text' field", "--text-field"),
                                    src={"a.jsonl": b'{"body": "words"}\n'}),
    "jsonl-number-field": Case(("a.jsonl:1: 'text' is a JSON number, not a string",),
                               src={"a.jsonl": b'{"text": 7}\n'}),
    "jsonl-escaped-nul": Case(("a.jsonl:1 holds NUL characters",),
                              src={"a.jsonl": b'{"text": "a\\u0000b"}\n'}),
    "jsonl-not-utf-8": Case(("a.jsonl:1 is not UTF-8 text",),
                            src={"a.jsonl": '{"text": "café"}\n'.encode("latin-1")}),
    "no-documents": Case(("holds no documents",), src={"a.jsonl": b"\n  \n"}),
    "empty-documents": Case(("holds only empty documents (2)",), src={"a.txt": b"", "b.txt": b""}),
    "bad-record-after-shards": Case(("a.jsonl:301 is a JSON array", "what it wrote was removed"),
                                    ("--tokenizer", "{tokenizer}", "--shard-size", "1kb"),
                                    src={"a.jsonl": LATE_BAD},
                                    small=("--seq-len", "16", "--no-progress")),
    "overwrite-replaces-a-partial-dataset": Case((), ("--overwrite",), dest="partial", exit_code=0),
}
"""Cases that import streaming and torch, most of them tokenizing (seconds each): slow."""
CASES = {**REFUSED_EARLY, **REFUSED_LATE}


def _snapshot(path: Path) -> dict[str, str] | None:
    """What is at ``path``: every file's relative name and content hash (None: nothing)."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.is_dir():
        return None
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
            for p in path.rglob("*")}


@dataclass
class Ran:
    done: subprocess.CompletedProcess[str]
    dest: Path
    watched: Path  # DEST, or the file it is below
    before: dict[str, str] | None  # what was at ``watched`` before the run


def _setup(base: Path, name: str, case: Case, prepared: Path) -> tuple[list[str], Path, Path]:
    """The case's SRC and DEST on disk; its command line, DEST, and the path that a refusal
    must leave as it was (DEST, or the file DEST is below)."""
    src = base / f"src-{name}"
    src.mkdir()
    for file, content in (GOOD if case.src is None else case.src).items():
        (src / file).write_bytes(content)
    dest = base / f"dest-{name}"
    if case.dest == "file":
        dest.write_text("keep me\n")
    elif case.dest == "below-file":
        (base / f"file-{name}").write_text("keep me\n")
        dest = base / f"file-{name}" / "sub"
    elif case.dest == "other-file":
        dest.mkdir()
        (dest / "keep.txt").write_text("mine\n")
    elif case.dest in ("dataset", "partial"):
        shutil.copytree(prepared, dest)
        if case.dest == "partial":  # as a run whose removal failed too leaves it
            (dest / INDEX).unlink()
    options = [o.format(tokenizer=prepared / "tokenizer.json") for o in case.options]
    watched = dest.parent if case.dest == "below-file" else dest
    return ["data", "prepare", str(src), str(dest), *case.small, *options], dest, watched


def _run_cases(base: Path, cases: dict[str, Case], dataset: Path) -> dict[str, Ran]:
    """Run ``cases`` at once, two per core; ``dataset`` is the folder the dataset and partial
    DESTs copy, and its tokenizer.json the ``{tokenizer}`` option."""
    setups = {name: _setup(base, name, case, dataset) for name, case in cases.items()}
    befores = {name: _snapshot(watched) for name, (_, _, watched) in setups.items()}
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(fljob, *args, cwd=base) for name, (args, _, _) in setups.items()}
    return {name: Ran(futures[name].result(), dest, watched, befores[name])
            for name, (_, dest, watched) in setups.items()}


@pytest.fixture(scope="module")
def early_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ran]:
    """Every case of REFUSED_EARLY, against a dataset of file names only."""
    pytest.importorskip("numpy", reason="numpy (the trainer extra) is not installed")
    base = tmp_path_factory.mktemp("prepare-early")
    names = (INDEX, "index.json", "tokenizer.json", "shard.00000.mds.zstd")
    dataset = base / "dataset"
    dataset.mkdir()
    for name in names:
        (dataset / name).write_text(f"the {name} of a dataset\n")
    return _run_cases(base, REFUSED_EARLY, dataset)


@pytest.fixture(scope="module")
def late_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ran]:
    """Every case of REFUSED_LATE, after one good preparation (its tokenizer.json and a
    dataset to copy)."""
    pytest.importorskip("torchtitan", reason="torchtitan (the trainer extra) is not installed")
    base = tmp_path_factory.mktemp("prepare-late")
    (base / "good").mkdir()
    for file, content in GOOD.items():
        (base / "good" / file).write_bytes(content)
    prepared = base / "prepared"
    done = fljob("data", "prepare", str(base / "good"), str(prepared), *SMALL, cwd=base)
    assert done.returncode == 0, done.stderr
    return _run_cases(base, REFUSED_LATE, prepared)


@pytest.mark.parametrize("name", [
    *(n for n, c in REFUSED_EARLY.items() if c.exit_code == 2),
    *(pytest.param(n, marks=pytest.mark.slow) for n, c in REFUSED_LATE.items() if c.exit_code == 2)])
def test_data_prepare_refuses_in_one_line_and_leaves_dest_as_it_was(request: pytest.FixtureRequest,
                                                                    name: str) -> None:
    runs = request.getfixturevalue("early_runs" if name in REFUSED_EARLY else "late_runs")
    ran = runs[name]
    one_line_error(ran.done, *CASES[name].words)
    assert ran.done.stderr.startswith("fljob data")
    assert _snapshot(ran.watched) == ran.before  # new: still nothing; a file, a dataset: untouched


@pytest.mark.slow
def test_overwrite_replaces_a_partial_dataset(late_runs: dict[str, Ran]) -> None:
    ran = late_runs["overwrite-replaces-a-partial-dataset"]
    assert ran.done.returncode == 0, ran.done.stderr
    index = json.loads((ran.dest / INDEX).read_text())
    assert index["documents"] == len(GOOD) and index["samples"] > 0
    assert ran.before is not None and INDEX not in ran.before


def test_data_prepare_into_a_read_only_folder(tmp_path: Path, tmpfs) -> None:
    out = tmpfs(read_only=True)
    one_line_error(fljob("data", "prepare", "builtin:pydoc", str(out / "data"), *SMALL, cwd=tmp_path),
                   f"cannot write {out}/data", "the file system is read-only", "nothing was written")


@pytest.mark.slow
def test_data_prepare_on_a_disk_that_fills_removes_what_it_wrote(tmp_path: Path, tmpfs) -> None:
    """The shards of the bundled corpus (about 900 kB of tokens) on 64 kB: the disk fills
    after a few 16 kB shards; exit 1, and the folders the run made are gone."""
    out = tmpfs(size="64k")
    done = fljob("data", "prepare", "builtin:pydoc", str(out / "a" / "data"), *SMALL, "--shard-size", "16kb",
                 cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"cannot write {out}/a/data" in done.stderr
    assert "no space left on the device; what it wrote was removed" in done.stderr
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------ fljob dashboard


def test_dashboard_into_a_read_only_folder(tmp_path: Path, tmpfs) -> None:
    out = tmpfs(read_only=True)
    one_line_error(fljob("dashboard", "-o", str(out / "grafana"), cwd=tmp_path),
                   f"cannot write {out}/grafana", "read-only", "nothing was written")


def test_dashboard_on_a_full_disk_writes_none_of_its_files(tmp_path: Path, tmpfs) -> None:
    out = tmpfs(size="24k")  # the dashboard JSON is about 40 kB
    one_line_error(fljob("dashboard", "-o", str(out / "grafana"), cwd=tmp_path), "no space left on the device")
    assert list(out.iterdir()) == []


def test_dashboard_into_a_path_below_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep me\n")
    one_line_error(fljob("dashboard", "-o", str(blocker / "grafana"), cwd=tmp_path), str(blocker),
                   "a part of the path is a file")
    assert blocker.read_text() == "keep me\n"


# ------------------------------------------------------------------ fljob mup coord-check

COORD_CHECK = ("mup", "coord-check", "--widths", "128,256", "--steps", "1", "--seeds", "1", "--vocab-size", "512",
               "--no-progress")
"""The smallest sweep: 4 runs of one step."""


@pytest.mark.parametrize("case", ["below-a-file", "a-folder", "read-only", "bad-option"])
def test_coord_check_refuses_an_output_before_the_sweep(tmp_path: Path, tmpfs, case: str) -> None:
    if case == "below-a-file":
        (tmp_path / "file").write_text("keep me\n")
        args, words = ("-o", str(tmp_path / "file" / "cc.png")), ("a part of the path is a file",)
    elif case == "a-folder":
        args, words = ("-o", str(tmp_path)), ("is a folder", "coord_check.png")
    elif case == "read-only":
        out = tmpfs(read_only=True)
        args, words = ("-o", str(out / "cc.png")), (f"cannot write {out}", "read-only")
    else:
        args, words = ("--widths", "banana"), ("--widths", "(see fljob mup coord-check --help)")
    done = fljob(*COORD_CHECK, *args, cwd=tmp_path)
    one_line_error(done, *words)
    assert done.stdout == ""  # refused before the sweep: no verdict
    assert not list(tmp_path.glob("**/cc.*"))


@pytest.mark.slow
def test_coord_check_on_a_full_disk_writes_neither_file(tmp_path: Path, tmpfs) -> None:
    """The sweep runs (the disk is not full yet when it starts); the PNG (about 130 kB) does
    not fit: neither it nor the .json is written."""
    out = tmpfs(size="64k")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: cc\nmodel: {flavor: 7.61M, depth: 2}\n")
    done = fljob(*COORD_CHECK, "--spec", str(spec), "-o", str(out / "cc.png"), cwd=tmp_path)
    one_line_error(done, f"cannot write {out}/cc.png", "no space left on the device", "nothing was written")
    assert list(out.iterdir()) == []
