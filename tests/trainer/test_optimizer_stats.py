"""OptimizerStats: against a float64 ground truth, sharded (FSDP2, 2 gloo ranks) against one
process, and no work off metric steps."""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fljob.trainer.metrics.optimizer_stats import GLOBAL_GROUP, OptimizerStats
from fljob.trainer.process_group import end_process_group

GROUPS = ("embedding", "hidden", "vector", "output")
BATCH = 4


class TinyModel(nn.Module):
    """Odd first dimensions (11, 7, 7) and a dim-0 size of 1 (``out``): under 2-way FSDP2 the
    shards are uneven and rank 1 holds empty shards of ``out``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.hidden = nn.Linear(6, 7)
        self.norm = nn.RMSNorm(7)
        self.out = nn.Linear(7, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.hidden(self.embed(tokens).mean(dim=1)))
        return self.out(self.norm(h)).squeeze(-1)


def build(seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    model = TinyModel()
    with torch.no_grad():  # RMSNorm starts at ones; move it so its norm is not trivial
        model.norm.weight.add_(0.1 * torch.randn(7))
    return model


def param_groups(model: TinyModel) -> list[dict]:
    """muP-shaped groups with distinct lr and weight decay, so a mix-up shows."""
    return [
        {"name": "embedding", "params": [model.embed.weight], "lr": 1e-2, "weight_decay": 0.1},
        {"name": "hidden", "params": [model.hidden.weight], "lr": 5e-3, "weight_decay": 0.2},
        {"name": "vector", "params": [model.hidden.bias, model.norm.weight, model.out.bias],
         "lr": 2e-2, "weight_decay": 0.0},
        {"name": "output", "params": [model.out.weight], "lr": 2e-3, "weight_decay": 0.1},
    ]


def batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 11, (BATCH, 3), generator=gen), torch.randn(BATCH, generator=gen))
            for _ in range(steps)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, stats: OptimizerStats,
          data: list[tuple[Tensor, Tensor]],
          rows: slice = slice(None)) -> dict[int, dict[str, float]]:
    """A plain loop; returns the statistics of each metric step."""
    results = {}
    for step, (tokens, target) in enumerate(data, start=1):
        loss = (model(tokens[rows]) - target[rows]).square().mean()
        loss.backward()
        stats.before_step(step)
        optimizer.step()
        values = stats.after_step(step)
        optimizer.zero_grad()
        if values is not None:
            results[step] = values
    return results


def floats(t: Tensor) -> list[float]:
    return t.detach().double().flatten().tolist()


class GroundTruth:
    """Plain-Python float64 statistics of one step, from copies taken around it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.before: dict[Tensor, list[float]] = {}
        self.grads: dict[Tensor, list[float]] = {}

    def capture(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.before = {p: floats(p) for p in params}
        self.grads = {p: floats(p.grad) for p in params if p.grad is not None}

    def expected(self) -> dict[str, float]:
        out: dict[str, float] = {}
        total: dict[str, list[float]] = {}
        for i, group in enumerate(self.optimizer.param_groups):
            name = group.get("name", f"group{i}")
            elems: dict[str, list[float]] = {k: [] for k in ("p", "g", "u", "m", "v")}
            for p in group["params"]:
                after = floats(p)
                elems["p"] += after
                if p in self.grads:
                    elems["g"] += self.grads[p]
                    elems["u"] += [a - b for a, b in zip(after, self.before[p], strict=True)]
                state = self.optimizer.state.get(p, {})
                if "exp_avg" in state:
                    elems["m"] += floats(state["exp_avg"])
                if "exp_avg_sq" in state:
                    elems["v"] += floats(state["exp_avg_sq"])
            out |= self._stats(name, elems)
            out[f"optim/{name}/lr"] = group["lr"]
            for k, v in elems.items():
                total.setdefault(k, []).extend(v)
        return out | self._stats(GLOBAL_GROUP, total)

    def _stats(self, name: str, e: dict[str, list[float]]) -> dict[str, float]:
        def l2(xs: list[float]) -> float:
            return math.sqrt(math.fsum(x * x for x in xs))

        s = {
            "param_norm": l2(e["p"]),
            "grad_norm": l2(e["g"]),
            "grad_max_abs": max((abs(x) for x in e["g"]), default=0.0),
            "update_norm": l2(e["u"]),
        }
        s["update_ratio"] = s["update_norm"] / s["param_norm"]
        if self._has("exp_avg"):
            s["exp_avg_norm"] = l2(e["m"])
        if self._has("exp_avg_sq"):
            s["exp_avg_sq_sqrt_norm"] = math.sqrt(math.fsum(e["v"]))
        return {f"optim/{name}/{k}": v for k, v in s.items()}

    def _has(self, key: str) -> bool:
        return any(key in st for st in self.optimizer.state.values())


def assert_close(got: dict[str, float], want: dict[str, float], rel: float, abs_: float) -> None:
    assert got.keys() == want.keys()
    bad = {k: (got[k], want[k]) for k in want
           if not math.isclose(got[k], want[k], rel_tol=rel, abs_tol=abs_)}
    assert not bad, bad


def run_against_ground_truth(optimizer_cls: type[torch.optim.Optimizer], steps: int = 3,
                             **kwargs: object) -> None:
    model = build()
    optimizer = optimizer_cls(param_groups(model), **kwargs)
    stats = OptimizerStats(optimizer, interval=1)
    truth = GroundTruth(optimizer)
    for step, (tokens, target) in enumerate(batches(steps), start=1):
        (model(tokens) - target).square().mean().backward()
        truth.capture()
        stats.before_step(step)
        optimizer.step()
        assert_close(stats.after_step(step), truth.expected(), rel=1e-5, abs_=1e-9)
        optimizer.zero_grad()


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_matches_float64_ground_truth(foreach: bool) -> None:
    run_against_ground_truth(torch.optim.AdamW, foreach=foreach)


def test_without_moments_the_moment_keys_are_absent() -> None:
    """SGD keeps no exp_avg/exp_avg_sq: those keys go, the rest is still exact."""
    run_against_ground_truth(torch.optim.SGD, momentum=0.9)


def test_fljob_optimizers_expose_moments() -> None:
    """Each registered optimizer's state is read correctly (ADOPT's first step moves nothing)."""
    optim = pytest.importorskip("fljob.trainer.optim")
    for name, cls in optim.OPTIMIZERS.items():
        for foreach in (False, True):
            run_against_ground_truth(cls, foreach=foreach)
        model = build()
        optimizer = cls(param_groups(model))
        values = train(model, optimizer, OptimizerStats(optimizer, interval=1), batches(1))[1]
        assert "optim/all/exp_avg_norm" in values, name
        assert "optim/all/exp_avg_sq_sqrt_norm" in values, name


def test_key_scheme_and_interval() -> None:
    model = build()
    optimizer = torch.optim.AdamW(param_groups(model))
    stats = OptimizerStats(optimizer, interval=2)
    results = train(model, optimizer, stats, batches(5))
    assert sorted(results) == [2, 4]
    stats_names = {"param_norm", "grad_norm", "grad_max_abs", "update_norm", "update_ratio",
                   "exp_avg_norm", "exp_avg_sq_sqrt_norm"}
    want = {f"optim/{g}/{s}" for g in (*GROUPS, GLOBAL_GROUP) for s in stats_names}
    want |= {f"optim/{g}/lr" for g in GROUPS}
    assert set(results[2]) == want
    assert all(isinstance(v, float) for v in results[2].values())


def test_unnamed_groups_and_bad_names() -> None:
    model = build()
    groups = param_groups(model)
    for g in groups:
        del g["name"]
    optimizer = torch.optim.AdamW(groups)
    values = train(model, optimizer, OptimizerStats(optimizer, interval=1), batches(1))[1]
    assert {k.split("/")[1] for k in values} == {"group0", "group1", "group2", "group3", "all"}
    for bad in ("all", "a/b", ""):
        groups = param_groups(build())
        groups[0]["name"] = bad
        with pytest.raises(ValueError, match="name"):
            OptimizerStats(torch.optim.AdamW(groups), interval=1)
    groups = param_groups(build())
    groups[1]["name"] = groups[0]["name"]
    with pytest.raises(ValueError, match="twice"):
        OptimizerStats(torch.optim.AdamW(groups), interval=1)
    with pytest.raises(ValueError, match="interval"):
        OptimizerStats(optimizer, interval=0)


def test_after_step_without_before_step_raises() -> None:
    optimizer = torch.optim.AdamW(param_groups(build()))
    stats = OptimizerStats(optimizer, interval=1)
    with pytest.raises(RuntimeError, match="before_step"):
        stats.after_step(1)


class OpLog(TorchDispatchMode):
    """Records every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_no_work_off_metric_steps() -> None:
    """Off metric steps neither method dispatches a single op (so no kernel, no sync); on a
    metric step nothing calls ``.item()`` (``_local_scalar_dense``)."""
    model = build()
    optimizer = torch.optim.AdamW(param_groups(model))
    stats = OptimizerStats(optimizer, interval=3)
    for step, (tokens, target) in enumerate(batches(3), start=1):
        (model(tokens) - target).square().mean().backward()
        with OpLog() as before:
            stats.before_step(step)
        optimizer.step()
        with OpLog() as after:
            values = stats.after_step(step)
        optimizer.zero_grad()
        if step < 3:
            assert values is None and before.ops == [] and after.ops == []
        else:
            assert values is not None and before.ops and after.ops
            assert not any("_local_scalar_dense" in op for op in before.ops + after.ops)


# --- two ranks --------------------------------------------------------------------------------

STEPS, INTERVAL = 4, 2
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast",
               "reduce_scatter_tensor", "barrier")


def count_collectives() -> dict[str, int]:
    """Wrap torch.distributed's collectives with counters (a mock that only counts)."""
    counts = {name: 0 for name in COLLECTIVES}

    def wrap(name: str) -> Callable[..., object]:
        real = getattr(dist, name)

        def counted(*args: object, **kwargs: object) -> object:
            counts[name] += 1
            return real(*args, **kwargs)
        return counted

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name))
    return counts


def replicated_setup(mesh: object | None) -> tuple[torch.optim.Optimizer, list[list[Tensor]]]:
    """A plain (DDP-style replica) parameter and, with a mesh, a Replicate DTensor one;
    gradients are set by hand, identical on every rank."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    torch.manual_seed(3)
    plain = nn.Parameter(torch.randn(3, 3))
    vector = torch.randn(5)
    grads = [[torch.randn(3, 3), torch.randn(5)] for _ in range(STEPS)]
    if mesh is not None:
        vector = distribute_tensor(vector, mesh, [Replicate()])
        grads = [[g, distribute_tensor(v, mesh, [Replicate()])] for g, v in grads]
    optimizer = torch.optim.AdamW([
        {"name": "hidden", "params": [plain], "lr": 1e-2},
        {"name": "vector", "params": [nn.Parameter(vector)], "lr": 3e-2, "weight_decay": 0.0},
    ])
    return optimizer, grads


def replicated_run(optimizer: torch.optim.Optimizer,
                   grads: list[list[Tensor]]) -> dict[int, dict[str, float]]:
    stats = OptimizerStats(optimizer, interval=1)
    params = [g["params"][0] for g in optimizer.param_groups]
    results = {}
    for step, step_grads in enumerate(grads, start=1):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        stats.before_step(step)
        optimizer.step()
        results[step] = stats.after_step(step)
    return results


def worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    model = build()
    for module in (model.hidden, model.out, model):
        fully_shard(module, mesh=mesh)
    model.set_force_sum_reduction_for_comms(True)  # gloo has no AVG; FSDP divides instead
    optimizer = torch.optim.AdamW(param_groups(model))
    stats = OptimizerStats(optimizer, interval=INTERVAL)

    counts = count_collectives()
    seen: dict[int, int] = {}
    orig_before, orig_after = stats.before_step, stats.after_step

    def before(step: int) -> None:
        start = sum(counts.values())
        orig_before(step)
        seen[step] = sum(counts.values()) - start

    def after(step: int) -> dict[str, float] | None:
        start, calls = sum(counts.values()), counts["all_reduce"]
        values = orig_after(step)
        seen[step] += sum(counts.values()) - start
        if values is not None:
            assert counts["all_reduce"] - calls == 2
        return values

    stats.before_step, stats.after_step = before, after  # type: ignore[method-assign]
    per_rank = BATCH // 2
    fsdp = train(model, optimizer, stats, batches(STEPS),
                 rows=slice(rank * per_rank, (rank + 1) * per_rank))
    replicated = replicated_run(*replicated_setup(mesh))
    with open(f"{out}/rank{rank}.pkl", "wb") as f:
        pickle.dump({"fsdp": fsdp, "replicated": replicated, "collectives": seen}, f)
    end_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("optimizer_stats")
    mp.start_processes(worker, args=(str(tmp / "store"), str(tmp)), nprocs=2,
                       start_method="spawn")
    return [pickle.loads(Path(tmp / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def test_fsdp2_two_ranks_match_one_process(two_ranks: list[dict]) -> None:
    """Acceptance: 2-way FSDP2 (uneven and empty shards) gives one process's numbers."""
    model = build()
    optimizer = torch.optim.AdamW(param_groups(model))
    single = train(model, optimizer, OptimizerStats(optimizer, interval=INTERVAL),
                   batches(STEPS))
    assert sorted(single) == [2, 4]
    for result in two_ranks:
        assert sorted(result["fsdp"]) == [2, 4]
        for step in single:
            assert_close(result["fsdp"][step], single[step], rel=1e-5, abs_=1e-8)
    assert two_ranks[0]["fsdp"] == two_ranks[1]["fsdp"]


def test_replicas_are_counted_once(two_ranks: list[dict]) -> None:
    """Plain-tensor replicas and Replicate DTensors are not summed once per rank."""
    single = replicated_run(*replicated_setup(None))
    for result in two_ranks:
        for step in single:
            assert_close(result["replicated"][step], single[step], rel=1e-6, abs_=1e-9)


def test_collectives_only_on_metric_steps(two_ranks: list[dict]) -> None:
    """Counted through wrappers around torch.distributed (see count_collectives): no
    collective off metric steps, exactly two all-reduces (SUM, MAX) on them."""
    for result in two_ranks:
        assert result["collectives"] == {1: 0, 2: 2, 3: 0, 4: 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_syncs() -> None:
    """On CUDA: no synchronising call off metric steps and exactly one on a metric step."""
    model = build().cuda()
    optimizer = torch.optim.AdamW(param_groups(model))
    stats = OptimizerStats(optimizer, interval=2)
    data = [(t.cuda(), y.cuda()) for t, y in batches(4)]
    train(model, optimizer, stats, data[:2])  # warm up: caches, lazy state
    for step, (tokens, target) in enumerate(data[2:], start=3):
        (model(tokens) - target).square().mean().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                stats.before_step(step)
                optimizer.step()
                values = stats.after_step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        optimizer.zero_grad()
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == (1 if values is not None else 0), [str(w.message) for w in syncs]
