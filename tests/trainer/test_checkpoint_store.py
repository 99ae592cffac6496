"""The commit protocol of fljob.trainer.checkpoint.store on a local folder: which steps count,
where resume goes when ``latest`` is missing or lies, what retention deletes, and error lines.

The same class runs on S3 in tests/integration/test_checkpoint_*.py against the real server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="torchtitan (the trainer extra) is not installed")

from test_writes import tmpfs as tmpfs  # noqa: PLC0414  (the real-tmpfs fixture, by its name)

from fljob.trainer.checkpoint.store import (
    COMMIT_MARKER,
    DCP_METADATA,
    LATEST,
    CheckpointStore,
    describe_error,
    normalize_uri,
    step_name,
)


def write_step(root: Path, step: int, *, metadata: bool = True) -> None:
    """What a DCP save leaves: shards, and the .metadata once it finished."""
    folder = root / step_name(step)
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"x" * (100 + step))
    if metadata:
        (folder / DCP_METADATA).write_bytes(b"meta")


def saved(root: Path, *steps: int) -> CheckpointStore:
    store = CheckpointStore(str(root))
    for step in steps:
        write_step(root, step)
        store.commit(step, {"time": "t"})
    return store


def test_commit_writes_marker_then_latest(tmp_path: Path) -> None:
    store = saved(tmp_path, 5)
    record = json.loads((tmp_path / "step-5" / COMMIT_MARKER).read_text())
    assert record["step"] == 5 and record["files"] == 1 and record["bytes"] == 105
    assert (tmp_path / LATEST).read_text().strip() == "step-5"
    assert store.latest_step() == 5
    assert not list(tmp_path.glob("*.tmp"))  # latest was written whole, by rename


def test_a_step_without_dcp_metadata_cannot_be_committed(tmp_path: Path) -> None:
    store = saved(tmp_path, 5)
    write_step(tmp_path, 10, metadata=False)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        store.commit(10, {})
    assert store.committed_steps() == [5] and store.latest_step() == 5


@pytest.mark.parametrize("latest", [None, "garbage\n", "step-10\n", "step-99\n"],
                         ids=["missing", "garbage", "uncommitted", "deleted"])
def test_resume_falls_back_to_the_newest_committed_step(tmp_path: Path, latest: str | None,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    store = saved(tmp_path, 3, 6)
    write_step(tmp_path, 10)  # shards and .metadata, but never committed: must not load
    if latest is None:
        (tmp_path / LATEST).unlink()
    else:
        (tmp_path / LATEST).write_text(latest)
    assert store.latest_step() == 6
    assert f"{tmp_path}/{LATEST}" in caplog.text and "resuming from step-6" in caplog.text


def test_a_broken_commit_marker_does_not_count(tmp_path: Path) -> None:
    store = saved(tmp_path, 3, 6)
    (tmp_path / "step-6" / COMMIT_MARKER).write_text('{"step": 7}')  # names another step
    assert store.committed_steps() == [3] and store.latest_step() == 3
    (tmp_path / "step-6" / COMMIT_MARKER).write_text("{trunc")
    assert store.latest_step() == 3


def test_nothing_saved_means_no_resume(tmp_path: Path) -> None:
    assert CheckpointStore(str(tmp_path / "absent")).latest_step() is None
    write_step(tmp_path, 4)  # an interrupted first save
    assert CheckpointStore(str(tmp_path)).latest_step() is None


def test_retention_counts_committed_steps_only(tmp_path: Path) -> None:
    store = saved(tmp_path, 2, 4)
    write_step(tmp_path, 5, metadata=False)  # a failed save between two commits
    write_step(tmp_path, 6)
    store.commit(6, {})
    write_step(tmp_path, 7, metadata=False)  # failed saves after the last commit...
    write_step(tmp_path, 8, metadata=False)
    write_step(tmp_path, 9, metadata=False)  # ...more of them than `keep`
    removed = store.apply_retention(keep=2)
    # Step 2 is beyond the newest two commits; step 5 is stale; 7-9 may still be in flight.
    assert removed == [2, 5]
    assert store.steps() == [4, 6, 7, 8, 9] and store.committed_steps() == [4, 6]
    assert store.latest_step() == 6


def test_uris_and_paths(tmp_path: Path) -> None:
    assert normalize_uri("s3://b/p/", str(tmp_path)) == "s3://b/p"
    assert normalize_uri("file:///x/y", str(tmp_path)) == "/x/y"
    assert normalize_uri("ckpt", str(tmp_path)) == str(tmp_path / "ckpt")
    assert CheckpointStore(str(tmp_path)).step_uri(7) == f"{tmp_path}/step-7"


def test_error_lines_are_one_line_and_mask_secrets() -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    secret = "s3cr3t-value"
    inner = OSError(f"upload refused\nfor key {secret} at http://127.0.0.1:1/b")
    wrapped = CheckpointException("save failed", {1: (inner, None), 0: (inner, None)})
    line = describe_error(wrapped, [secret])
    assert line.startswith("rank 0: OSError: upload refused")
    assert "\n" not in line and secret not in line and "***" in line


def test_the_marker_records_every_file_and_its_size(tmp_path: Path) -> None:
    saved(tmp_path, 5)
    record = json.loads((tmp_path / "step-5" / COMMIT_MARKER).read_text())
    assert record["sizes"] == {"__0_0.distcp": 105, DCP_METADATA: 4}


def test_damage_names_the_first_wrong_file(tmp_path: Path) -> None:
    store = saved(tmp_path, 5)
    record = store.commit_record(5)
    assert store.damage(5, record) is None
    shard = tmp_path / "step-5" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:50])  # a truncated copy
    assert store.damage(5, record) == "__0_0.distcp is 50 bytes, the commit recorded 105"
    (tmp_path / "step-5" / DCP_METADATA).unlink()
    assert store.damage(5, record) == ".metadata is missing (and 1 more files differ)"


def test_damage_under_a_marker_without_sizes_checks_the_shard_totals(tmp_path: Path) -> None:
    """Markers written before per-file sizes: the shards' count and bytes, and .metadata."""
    store = saved(tmp_path, 5)
    record = {k: v for k, v in store.commit_record(5).items() if k != "sizes"}
    assert store.damage(5, record) is None
    (tmp_path / "step-5" / "__0_0.distcp").write_bytes(b"x")
    assert store.damage(5, record) == ("its shards are 1 files of 1 bytes, the commit recorded 1 "
                                       "files of 105 bytes")
    (tmp_path / "step-5" / DCP_METADATA).unlink()
    assert store.damage(5, record) == ".metadata is missing"


def test_a_file_where_a_step_folder_belongs_is_no_step(tmp_path: Path) -> None:
    (tmp_path / "step-3").write_text("stray")
    store = CheckpointStore(str(tmp_path))
    assert store.files(3) == {} and store.steps() == []


def test_a_write_that_runs_out_of_space_leaves_no_half_file(tmpfs) -> None:
    """On a real full tmpfs: `latest` or a marker that does not fit leaves nothing behind."""
    disk = tmpfs(size="64k")
    store = CheckpointStore(str(disk))
    with pytest.raises(OSError, match="No space left on device"):
        store.write_object(LATEST, bytes(128 * 1024))
    assert list(disk.iterdir()) == []
