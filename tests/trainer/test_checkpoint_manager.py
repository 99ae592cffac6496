"""fljob's CheckpointManager on small torchtitan components in one process (gloo world of one):
sync and async saves commit, an async save that fails is not committed and the next one is,
a load restores every state, and resume rules hold. The full trainer runs in
tests/integration/test_checkpoint.py; this covers the async path, which `fljob train` uses
only on CUDA.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
from stateful import Counter

pytest.importorskip("torchtitan", reason="torchtitan (the trainer extra) is not installed")

import torch
from test_writes import tmpfs as tmpfs  # noqa: PLC0414  (the real-tmpfs fixture, by its name)
from torch import nn
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import Checkpoint as CheckpointConfig

from fljob.errors import UsageError
from fljob.spec.models import JobSpec
from fljob.trainer.checkpoint import CheckpointError, FljobCheckpointManager, open_store

pytestmark = pytest.mark.usefixtures("world_of_one")


COMPATIBILITY = {"optimizer.name": "adamw", "model.width": 16}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: async staging from GPU memory untested"))]


def build(tmp_path: Path, *, async_mode: str = "disabled", resume: bool = True, keep: int = 2,
          device: str = "cpu", ckpt: Path | None = None, hidden: int = 16, lr: float = 1e-2,
          foreach: bool = False, steps: int = 50, compatibility: dict[str, Any] = COMPATIBILITY,
          ) -> tuple[FljobCheckpointManager, nn.Module, Counter]:
    """A manager over a small model; ``ckpt`` defaults to ``tmp_path/ckpt``."""
    ckpt = ckpt or tmp_path / "ckpt"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, hidden), nn.Linear(hidden, 4)).to(device)
    optimizers = OptimizersContainer([model], torch.optim.AdamW, {"lr": lr, "foreach": foreach})
    schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0 / (1 + step))
    state = Counter()
    spec = JobSpec.model_validate({"name": "unit", "run_dir": str(tmp_path / "run"),
                                   "optimizer": {"lr": lr}, "training": {"steps": steps},
                                   "checkpoint": {"uri": str(ckpt), "keep_latest": keep,
                                                  "resume": resume}})
    config = CheckpointConfig(enable=True, folder=str(ckpt), interval=1,
                              async_mode=async_mode, last_save_model_only=False)
    manager = FljobCheckpointManager(
        store=open_store(str(ckpt), spec), spec=spec, checkpoint_config=config,
        keep_latest=keep, resume=resume, compatibility=compatibility, dataloader=Counter(),
        model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
        states={"train_state": state})
    return manager, model, state


def train_step(model: nn.Module, manager: FljobCheckpointManager, state: Counter) -> None:
    model(torch.randn(4, 8, device=model[0].weight.device)).square().mean().backward()
    manager.states["optimizer"].step()
    manager.states["optimizer"].zero_grad()
    manager.states["lr_scheduler"].step()
    state.step += 1
    state.ntokens_seen += 32


def latest(tmp_path: Path) -> str:
    return (tmp_path / "ckpt" / "latest").read_text().strip()


@pytest.mark.parametrize("device", DEVICES)
def test_async_saves_commit_and_a_failed_one_does_not(tmp_path: Path, device: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    manager, model, state = build(tmp_path, async_mode="async", keep=3, device=device)
    for _ in range(2):
        train_step(model, manager, state)
    manager.save(2)  # returns once staged; the upload and the commit go on in a thread
    manager.save(3)  # waits for step 2 first
    assert latest(tmp_path) in ("step-2", "step-3")
    # A file where step-4's folder must go: DCP cannot create it, the async save fails.
    (tmp_path / "ckpt" / "step-4").write_text("in the way")
    state.step = 4
    manager.save(4)
    manager.save(5)  # waits for step 4, which failed: no commit, no exception
    assert "step-4 was not committed" in caplog.text and "training continues" in caplog.text
    manager.close()  # waits for step 5
    assert latest(tmp_path) == "step-5"
    assert "Retention in" not in caplog.text  # a stray file is no step: left alone
    committed = sorted(p.parent.name for p in (tmp_path / "ckpt").glob("step-*/COMMITTED"))
    assert committed == ["step-2", "step-3", "step-5"]
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    fresh, fresh_model, _ = build(tmp_path, device=device)
    assert fresh.load()  # step 5, staged from `device` while training went on
    assert all(torch.equal(fresh_model.state_dict()[k].cpu(), v) for k, v in weights.items())
    fresh.close()


def test_load_restores_model_optimizer_schedule_and_counters(tmp_path: Path) -> None:
    manager, model, state = build(tmp_path)
    for _ in range(3):
        train_step(model, manager, state)
    manager.save(3, last_step=True)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    lr = manager.states["lr_scheduler"].schedulers[0].get_last_lr()
    marker = json.loads((tmp_path / "ckpt" / "step-3" / "COMMITTED").read_text())
    assert marker["rank_tokens_seen"] == 96 and marker["world_size"] == 1
    manager.close()

    fresh, fresh_model, fresh_state = build(tmp_path)
    assert not torch.equal(fresh_model[0].weight, saved["0.weight"])
    assert fresh.load()
    assert all(torch.equal(fresh_model.state_dict()[k], v) for k, v in saved.items())
    assert (fresh_state.step, fresh_state.ntokens_seen) == (3, 96)
    assert fresh.states["lr_scheduler"].schedulers[0].get_last_lr() == lr
    optim_state = fresh.states["optimizer"].optimizers[0].state
    assert all(int(s["step"]) == 3 for s in optim_state.values())
    fresh.save(3, last_step=True)  # already committed: nothing is written again
    fresh.close()


def test_resume_off_refuses_a_location_with_commits(tmp_path: Path) -> None:
    manager, model, state = build(tmp_path)
    train_step(model, manager, state)
    manager.save(1, last_step=True)
    manager.close()
    again, _, _ = build(tmp_path, resume=False)
    with pytest.raises(UsageError, match="already holds committed checkpoints"):
        again.load()
    again.close()


def test_a_missing_step_cannot_be_loaded_by_number(tmp_path: Path) -> None:
    manager, _, _ = build(tmp_path)
    assert not manager.load()  # nothing saved: a fresh start
    with pytest.raises(CheckpointError, match="step-7 is not a committed checkpoint"):
        manager.load(7)
    manager.close()


# --------------------------------------------------------------------------- lock


def test_a_second_run_on_the_same_location_is_refused_until_the_first_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLJOB_RUN_ID", "run-7")
    first, model, state = build(tmp_path)
    with pytest.raises(UsageError, match=(
            rf"^checkpoint location {tmp_path}/ckpt is in use by run run-7 \(host \S+, pid "
            rf"{os.getpid()}\) since \S+Z: wait for that run to end, or give this run another "
            r"checkpoint.uri")):
        build(tmp_path)
    train_step(model, first, state)
    first.save(1, last_step=True)  # the refused run changed nothing
    first.close()
    again, _, _ = build(tmp_path)  # closed: free again
    assert again.load()
    again.close()


def test_a_run_whose_lock_file_was_removed_stops_before_writing(tmp_path: Path) -> None:
    """Removing LOCK lets another run lock a new file: this one must not write any more."""
    manager, model, state = build(tmp_path)
    (tmp_path / "ckpt" / "LOCK").unlink()
    train_step(model, manager, state)
    with pytest.raises(CheckpointError, match="LOCK was removed while this run held it"):
        manager.save(1)  # not the final save, still fatal
    assert not (tmp_path / "ckpt" / "step-1").exists()
    manager.close()


# --------------------------------------------------------------------------- changed spec


def saved_once(tmp_path: Path) -> None:
    manager, model, state = build(tmp_path)
    train_step(model, manager, state)
    manager.save(1, last_step=True)
    manager.close()


def test_resume_refuses_what_the_checkpoint_depends_on(tmp_path: Path) -> None:
    saved_once(tmp_path)
    changed, model, state = build(tmp_path, compatibility={**COMPATIBILITY, "optimizer.name": "adopt"})
    before = model[0].weight.clone()
    with pytest.raises(UsageError, match=r"^cannot resume \S+/ckpt/step-1: the spec changed what the "
                                         r"checkpoint depends on \(optimizer.name 'adamw' -> 'adopt'\)"):
        changed.load()
    assert torch.equal(model[0].weight, before) and state.step == 0  # nothing was loaded
    changed.close()


def test_resume_applies_or_warns_about_safe_changes(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """More steps apply; a new learning rate and another update path are allowed, but the
    learning rate is the checkpoint's (it lives in the optimizer state: the log says so) while
    the update path stays the running one."""
    caplog.set_level(logging.INFO)
    saved_once(tmp_path)
    longer, _, state = build(tmp_path, steps=80, lr=5e-3, foreach=True)
    assert longer.load() and state.step == 1
    assert "with changed settings: training.steps 50 -> 80" in caplog.text
    assert "with optimizer.lr 0.01 -> 0.005: no effect, the checkpoint restores its own value" in caplog.text
    group = longer.states["optimizer"].optimizers[0].param_groups[0]
    assert group["initial_lr"] == 1e-2 and group["foreach"] is True
    longer.close()


def test_a_checkpoint_without_a_record_resumes_with_a_warning(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    saved_once(tmp_path)
    manifest_path = tmp_path / "ckpt" / "step-1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["compatibility"]  # as fljob wrote it before records existed
    manifest_path.write_text(json.dumps(manifest))
    marker = tmp_path / "ckpt" / "step-1" / "COMMITTED"
    record = json.loads(marker.read_text())
    record["sizes"]["manifest.json"] = manifest_path.stat().st_size
    marker.write_text(json.dumps(record))
    old, _, _ = build(tmp_path, compatibility={**COMPATIBILITY, "optimizer.name": "adopt"})
    assert old.load()
    assert "step-1 has no compatibility record" in caplog.text and "resuming anyway" in caplog.text
    old.close()


# --------------------------------------------------------------------------- integrity


def test_a_damaged_newest_step_is_uncommitted_and_resume_falls_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manager, model, state = build(tmp_path, keep=3)
    for step in (1, 2):
        train_step(model, manager, state)
        manager.save(step)
    manager.close()
    shard = tmp_path / "ckpt" / "step-2" / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])

    fresh, _, fresh_state = build(tmp_path, keep=3)
    assert fresh.load() and fresh_state.step == 1
    assert (f"step-2 is damaged (__0_0.distcp is {size // 2} bytes, the commit recorded {size}): it "
            "no longer counts as committed (its marker is removed) and this run resumes from "
            "step-1 instead") in caplog.text
    assert not (tmp_path / "ckpt" / "step-2" / "COMMITTED").exists()
    assert latest(tmp_path) == "step-1"
    fresh.save(2)  # saved again from scratch: the damaged files are cleared first
    assert latest(tmp_path) == "step-2" and fresh.store.damage(2, fresh.store.commit_record(2)) is None
    fresh.close()


def test_with_no_intact_step_the_run_stops_and_changes_nothing(tmp_path: Path) -> None:
    saved_once(tmp_path)
    (tmp_path / "ckpt" / "step-1" / ".metadata").unlink()
    fresh, _, _ = build(tmp_path)
    with pytest.raises(CheckpointError, match=r"no intact committed checkpoint in \S+: step-1 is "
                                              r"damaged \(.metadata is missing\); restore the files"):
        fresh.load()
    with pytest.raises(CheckpointError, match=r"step-1 is damaged: .metadata is missing"):
        fresh.load(1)
    assert (tmp_path / "ckpt" / "step-1" / "COMMITTED").exists() and latest(tmp_path) == "step-1"
    fresh.close()


def test_a_save_that_runs_out_of_space_leaves_nothing_behind(
        tmp_path: Path, tmpfs, caplog: pytest.LogCaptureFixture) -> None:
    """On a real full tmpfs: the failed save's partial step is removed, so once some space is
    back the next save fits; left behind, it would hold more than the filler freed."""
    hidden = 16384  # a ~1.2 MB checkpoint: its bytes, not tmpfs pages, decide what fits
    probe, model, state = build(tmp_path / "probe", hidden=hidden)
    train_step(model, probe, state)
    probe.save(1, last_step=True)
    probe.close()
    size = sum(f.stat().st_size for f in (tmp_path / "probe" / "ckpt" / "step-1").iterdir())

    caplog.set_level(logging.INFO)
    disk = tmpfs(size=f"{size * 3 // 2 // 1024}k")
    filler = disk / "filler"
    filler.write_bytes(bytes(size * 7 // 10))  # 0.8 of a checkpoint left: the save cannot fit
    manager, model, state = build(tmp_path, ckpt=disk / "ckpt", hidden=hidden)
    try:  # closed whatever happens: its LOCK file would keep the mount busy
        train_step(model, manager, state)
        manager.save(1)
        # torch.save reports the full disk as "unexpected pos ..."; the free space says what it was.
        assert re.search(rf"step-1 was not committed \(rank 0: .*; 0\.\d MiB free in {disk}/ckpt\)",
                         caplog.text)
        assert f"Removed the partial {disk}/ckpt/step-1" in caplog.text
        assert not (disk / "ckpt" / "step-1").exists()
        filler.unlink()  # 0.7 of a checkpoint freed: enough only without the partial step
        train_step(model, manager, state)
        manager.save(2)
        assert (disk / "ckpt" / "latest").read_text().strip() == "step-2"
    finally:
        manager.close()
