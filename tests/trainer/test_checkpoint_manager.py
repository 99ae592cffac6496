"""fljob's CheckpointManager on small torchtitan components in one process (gloo world of one):
sync and async saves commit, an async save that fails is not committed and the next one is,
a load restores every state, and resume rules hold. The full trainer runs in
tests/integration/test_checkpoint.py; this covers the async path, which `fljob train` uses
only on CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchtitan", reason="torchtitan (the trainer extra) is not installed")

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import Checkpoint as CheckpointConfig

from fljob.spec.models import JobSpec
from fljob.trainer.checkpoint import CheckpointError, FljobCheckpointManager, open_store


class Counter:
    """Stands for the trainer's train state and the dataloader: a Stateful position."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]


@pytest.fixture(scope="module", autouse=True)
def world_of_one(tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: async staging from GPU memory untested"))]


def build(tmp_path: Path, *, async_mode: str = "disabled", resume: bool = True,
          keep: int = 2, device: str = "cpu") -> tuple[FljobCheckpointManager, nn.Module, Counter]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).to(device)
    optimizers = OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-2})
    schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0 / (1 + step))
    state = Counter()
    spec = JobSpec.model_validate({"name": "unit", "run_dir": str(tmp_path / "run"),
                                   "checkpoint": {"uri": str(tmp_path / "ckpt"),
                                                  "keep_latest": keep, "resume": resume}})
    config = CheckpointConfig(enable=True, folder=str(tmp_path / "ckpt"), interval=1,
                              async_mode=async_mode, last_save_model_only=False)
    manager = FljobCheckpointManager(
        store=open_store(str(tmp_path / "ckpt"), spec), spec=spec, checkpoint_config=config,
        keep_latest=keep, resume=resume, dataloader=Counter(), model_parts=[model],
        optimizers=optimizers, lr_schedulers=schedulers, states={"train_state": state})
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
    with pytest.raises(CheckpointError, match="already holds committed checkpoints"):
        again.load()
    again.close()


def test_a_missing_step_cannot_be_loaded_by_number(tmp_path: Path) -> None:
    manager, _, _ = build(tmp_path)
    assert not manager.load()  # nothing saved: a fresh start
    with pytest.raises(CheckpointError, match="step-7 is not a committed checkpoint"):
        manager.load(7)
    manager.close()
