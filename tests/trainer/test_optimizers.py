"""Tests for fljob.trainer.optim against plain float64 re-statements of the published rules.

The reference functions below work on one scalar element at a time with Python floats and
share no code with the implementation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR, LinearLR

from fljob.trainer.optim import (
    ADOPT,
    OPTIMIZERS,
    QHADOPT,
    AdamW,
    DecoupledAdamW,
    QHAdamW,
    build_optimizer,
)
from fljob.trainer.process_group import end_process_group

SHAPES = [(4, 3), (5,), (2, 3, 2), (3,)]
STEPS = 8
# LambdaLR multipliers, one per optimizer step; they scale lr and (decoupled) weight decay.
FACTORS = [1.0, 0.5, 0.8, 0.25, 1.0, 0.6, 0.3, 0.9]


# ---------------------------------------------------------------------------------------
# Float64 references, one element at a time. `mode` is how weight decay enters:
#   "torch":     p <- p * (1 - lr * wd)                 (torch AdamW)
#   "decoupled": p <- p * (1 - lr / initial_lr * wd)    (Composer / fljob decouple=True)
#   "coupled":   g <- g + wd * p                          (L2, fljob decouple=False)
# ---------------------------------------------------------------------------------------


def ref_adam(p, grads, lrs, lr0, wd, eps, betas, mode):
    """Adam (Kingma & Ba) with bias correction and the given weight-decay mode."""
    b1, b2 = betas
    m = v = 0.0
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if mode == "torch":
            p = p * (1 - lr * wd)
        elif mode == "decoupled":
            p = p * (1 - lr / lr0 * wd)
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


def ref_qhadam(p, grads, lrs, lr0, wd, eps, betas, nus, mode):
    """QHAdam (Ma & Yarats 2019, Algorithm 2)."""
    b1, b2 = betas
    nu1, nu2 = nus
    m = v = 0.0
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if mode == "decoupled":
            p = p * (1 - lr / lr0 * wd)
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        numer = (1 - nu1) * g + nu1 * m_hat
        denom = math.sqrt((1 - nu2) * g * g + nu2 * v_hat) + eps
        p = p - lr * numer / denom
    return p


def ref_adopt(p, grads, lrs, lr0, wd, eps, betas, nu, clip_exponent, mode, clip_hits):
    """ADOPT (Taniguchi et al. 2024, Algorithm 2) with a quasi-hyperbolic step (nu=1: ADOPT)."""
    b1, b2 = betas
    g0 = grads[0] + (wd * p if mode == "coupled" else 0.0)
    v = g0 * g0
    m = 0.0
    for t in range(1, len(grads)):
        g, lr = grads[t], lrs[t]
        if mode == "decoupled":
            p = p * (1 - lr / lr0 * wd)
        else:
            g = g + wd * p
        g_hat = g / max(math.sqrt(v), eps)
        if clip_exponent is not None:
            c = t**clip_exponent
            if abs(g_hat) > c:
                clip_hits.append(t)
                g_hat = math.copysign(c, g_hat)
        m = b1 * m + (1 - b1) * g_hat
        p = p - lr * ((1 - nu) * g_hat + nu * m)
        v = b2 * v + (1 - b2) * g * g
    return p


# One case per optimizer and weight-decay mode, with non-default hyperparameters.
CASES: dict[str, tuple[str, dict, Callable]] = {
    "adamw": (
        "adamw",
        {"betas": (0.8, 0.9)},
        lambda p, gs, lrs, lr0, wd, eps, kw, hits: ref_adam(
            p, gs, lrs, lr0, wd, eps, kw["betas"], "torch"
        ),
    ),
    "decoupled_adamw": (
        "decoupled_adamw",
        {"betas": (0.8, 0.9)},
        lambda p, gs, lrs, lr0, wd, eps, kw, hits: ref_adam(
            p, gs, lrs, lr0, wd, eps, kw["betas"], "decoupled"
        ),
    ),
    **{
        f"qhadamw-{mode}": (
            "qhadamw",
            {"betas": (0.8, 0.9), "nus": (0.6, 0.8), "decouple": mode == "decoupled"},
            lambda p, gs, lrs, lr0, wd, eps, kw, hits, mode=mode: ref_qhadam(
                p, gs, lrs, lr0, wd, eps, kw["betas"], kw["nus"], mode
            ),
        )
        for mode in ("decoupled", "coupled")
    },
    **{
        f"{name}-{mode}": (
            name,
            dict(betas=(0.7, 0.95), decouple=mode == "decoupled", **extra),
            lambda p, gs, lrs, lr0, wd, eps, kw, hits, mode=mode: ref_adopt(
                p, gs, lrs, lr0, wd, eps, kw["betas"], kw.get("nus", (1.0, 1.0))[0],
                kw.get("clip_exponent", 0.25), mode, hits,
            ),
        )
        for name, extra in (("adopt", {}), ("qhadopt", {"nus": (0.6, 1.0)}))
        for mode in ("decoupled", "coupled")
    },
    "adopt-noclip": (
        "adopt",
        {"betas": (0.7, 0.95), "clip_exponent": None},
        lambda p, gs, lrs, lr0, wd, eps, kw, hits: ref_adopt(
            p, gs, lrs, lr0, wd, eps, kw["betas"], 1.0, None, "coupled", hits
        ),
    ),
}

# Per-group hyperparameters as muP groups set them: lr, weight_decay and eps all differ.
GROUPS = [
    {"idx": [0, 2, 3], "lr": 0.03, "weight_decay": 0.05, "eps": 1e-3},
    {"idx": [1], "lr": 0.01, "weight_decay": 0.2, "eps": 0.3},
]


def make_params(dtypes=(torch.float32,) * 4) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen).to(dt))
        for s, dt in zip(SHAPES, dtypes, strict=True)
    ]


def make_grads(params, steps: int = STEPS) -> list[list[torch.Tensor]]:
    """grads[k][i]: gradient of parameter i at step k; one step has outliers so ADOPT clips."""
    gen = torch.Generator().manual_seed(1)
    grads = []
    for k in range(steps):
        scale = 20.0 if k == 2 else 1.0
        grads.append([scale * torch.randn(p.shape, generator=gen).to(p.dtype) for p in params])
    return grads


def make_optimizer(name, params, kwargs, foreach):
    groups = [
        {"params": [params[i] for i in g["idx"]], **{k: v for k, v in g.items() if k != "idx"}}
        for g in GROUPS
    ]
    return build_optimizer(name, groups, foreach=foreach, **kwargs)


def run(opt, params, grads, skip=None):
    """One optimizer and LambdaLR step per gradient set; `skip` = {(step, param)} gets no grad."""
    sched = LambdaLR(opt, lambda k: FACTORS[k % len(FACTORS)])
    for k, gs in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = None if skip and (k, i) in skip else g.clone()
        opt.step()
        sched.step()
    return sched


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case: str, foreach: bool) -> None:
    name, kwargs, reference = CASES[case]
    params = make_params()
    start = [p.detach().double().clone() for p in params]
    grads = make_grads(params)
    run(make_optimizer(name, params, kwargs, foreach), params, grads)

    clip_hits: list[int] = []
    for g in GROUPS:
        lrs = [g["lr"] * f for f in FACTORS]
        for i in g["idx"]:
            flat_grads = [gs[i].double().flatten().tolist() for gs in grads]
            expected = [
                reference(p0, [fg[e] for fg in flat_grads], lrs, g["lr"], g["weight_decay"],
                          g["eps"], kwargs, clip_hits)
                for e, p0 in enumerate(start[i].flatten().tolist())
            ]
            actual = params[i].detach().double().flatten()
            torch.testing.assert_close(
                actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
            )
            assert not torch.equal(actual, start[i].flatten()), "parameters did not move"
    if name in ("adopt", "qhadopt") and kwargs.get("clip_exponent", 0.25) is not None:
        assert clip_hits, "the gradients were meant to trigger ADOPT's clipping"


@pytest.mark.parametrize("case", list(CASES))
def test_foreach_equals_single_tensor(case: str) -> None:
    """Same result bit for bit, with mixed dtypes in a group and a parameter that skips steps,
    so that step counts differ inside a device/dtype bucket."""
    name, kwargs, _ = CASES[case]
    results = []
    for foreach in (False, True):
        params = make_params((torch.float32, torch.float32, torch.float32, torch.float64))
        opt = make_optimizer(name, params, kwargs, foreach)
        run(opt, params, make_grads(params), skip={(1, 2), (3, 2), (4, 1)})
        results.append((params, opt))
    (p_single, o_single), (p_foreach, o_foreach) = results
    assert o_single.state[p_single[0]]["step"] != o_single.state[p_single[2]]["step"]
    for a, b in zip(p_single, p_foreach):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o_single.state[a][key], o_foreach.state[b][key]), key


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip(name: str, foreach: bool, k: int) -> None:
    """Stop after k steps, save through torch.save (weights_only load), resume in fresh
    objects: identical to an uninterrupted run. k=1 is ADOPT's seeding step."""
    kwargs = {"weight_decay": 0.1} if name == "adamw" else {"decouple": True}
    kwargs = {} if name == "decoupled_adamw" else kwargs
    params = make_params()
    grads = make_grads(params)
    run(make_optimizer(name, params, kwargs, foreach), params, grads)

    first = make_params()
    opt = make_optimizer(name, first, kwargs, foreach)
    sched = run(opt, first, grads[:k])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = make_optimizer(name, resumed, kwargs, foreach)
    sched2 = LambdaLR(opt2, lambda j: FACTORS[j % len(FACTORS)])  # built first, as trainers do
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for gs in grads[k:]:
        for p, g in zip(resumed, gs):
            p.grad = g.clone()
        opt2.step()
        sched2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def _decoupled(name: str) -> dict:
    return {} if name == "decoupled_adamw" else {"decouple": True}


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("name", ["decoupled_adamw", "qhadamw", "adopt", "qhadopt", "adamw"])
def test_zero_gradient_decay_shrinks_by_documented_amount(name: str, foreach: bool) -> None:
    """With g = 0 only weight decay acts. Decoupled: p *= 1 - (lr/initial_lr) * wd per step;
    torch AdamW: p *= 1 - lr * wd. ADOPT's seeding step applies no decay."""
    wd, lr0 = 0.1, 0.5
    p0 = torch.tensor([1.5, -2.0, 0.25, -0.75])
    p = torch.nn.Parameter(p0.clone())
    kwargs = {} if name == "adamw" else _decoupled(name)
    opt = build_optimizer(name, [p], lr=lr0, weight_decay=wd, foreach=foreach, **kwargs)
    sched = LambdaLR(opt, lambda k: FACTORS[k % len(FACTORS)])
    expected = p0.double()
    for k in range(STEPS):
        before = p.detach().abs().clone()
        p.grad = torch.zeros_like(p)
        opt.step()
        seeding = name in ("adopt", "qhadopt") and k == 0
        per_step = lr0 * FACTORS[k] * wd if name == "adamw" else FACTORS[k] * wd
        expected = expected if seeding else expected * (1 - per_step)
        if not seeding:
            assert (p.detach().abs() < before).all(), "weights must shrink toward zero"
        sched.step()
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("name", ["qhadamw", "adopt", "qhadopt"])
def test_zero_gradient_coupled_decay_pulls_toward_zero(name: str, foreach: bool) -> None:
    """Coupled decay feeds g = +wd * p to the moments. With g = 0 the first real update
    moves every weight toward zero by (about) lr times a known factor, never away."""
    wd, lr, beta1, nu1 = 0.1, 0.01, 0.9, 0.6
    p0 = torch.tensor([1.5, -2.0, 0.25, -0.75])
    p = torch.nn.Parameter(p0.clone())
    kwargs = {"betas": (beta1, 0.99), "decouple": False}
    if name != "adopt":
        kwargs["nus"] = (nu1, 1.0)
    opt = build_optimizer(name, [p], lr=lr, weight_decay=wd, foreach=foreach, **kwargs)
    p.grad = torch.zeros_like(p)
    opt.step()
    if name == "qhadamw":
        # m_hat = g, v_hat = g^2: step = lr * g / (|g| + eps), g = wd * p0.
        g = wd * p0.double()
        expected = p0.double() - lr * g / (g.abs() + 1e-8)
    else:
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)  # seeding step
        opt.step()
        # v = g^2, g_hat = sign(p0) (clip c_1 = 1), m = (1 - beta1) g_hat.
        nu = 1.0 if name == "adopt" else nu1
        expected = p0.double() - lr * ((1 - nu) + nu * (1 - beta1)) * p0.sign()
    assert (p.detach().abs() < p0.abs()).all()
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("exponent", [0.25, 0.5, None])
def test_adopt_clip_schedule(exponent: float | None, foreach: bool) -> None:
    """At update t a huge normalised gradient is clipped to t**exponent (none if disabled)."""
    t_big = 16
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ADOPT([p], lr=1e-3, betas=(0.0, 0.5), clip_exponent=exponent, foreach=foreach)
    for t in range(t_big + 1):  # t = 0 seeds v; t >= 1 are updates
        p.grad = torch.full_like(p, 1e3 if t == t_big else 1e-2)
        if t == t_big:
            unclipped = p.grad / opt.state[p]["exp_avg_sq"].sqrt()
        opt.step()
    g_hat = opt.state[p]["exp_avg"]  # beta1 = 0: m_t is exactly the clipped g_hat
    if exponent is None:
        torch.testing.assert_close(g_hat, unclipped)
    else:
        assert (unclipped > t_big**exponent).all(), "the test must exceed the clip value"
        torch.testing.assert_close(g_hat, torch.full_like(p, t_big**exponent))


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("cls", [ADOPT, QHADOPT])
def test_adopt_first_step_only_seeds_second_moment(cls, foreach: bool) -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = cls([p], lr=0.1, weight_decay=0.5, decouple=True, foreach=foreach)
    p.grad = torch.tensor([0.5, 2.0, -1.0])
    opt.step()
    state = opt.state[p]
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0, 3.0]))
    assert torch.equal(state["exp_avg_sq"], p.grad**2)
    assert torch.equal(state["exp_avg"], torch.zeros(3))
    assert state["step"].item() == 1.0 and state["step"].device.type == "cpu"


@pytest.mark.parametrize("name", ["decoupled_adamw", "qhadamw", "adopt", "qhadopt"])
def test_decoupled_decay_follows_schedule_not_group_lr(name: str) -> None:
    """With a warm-up scheduler the per-step decay is factor * wd in every group: muP groups
    with lr 1e-2 and 1e-4 decay alike, and the warm-up factor (not lr) scales it."""
    wd, start_factor = 0.2, 0.1
    big, small = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(
        name, [{"params": [big], "lr": 1e-2}, {"params": [small], "lr": 1e-4}],
        weight_decay=wd, **_decoupled(name),
    )
    sched = LinearLR(opt, start_factor=start_factor, total_iters=4)
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-2, 1e-4]
    expected = 1.0
    for k in range(6):
        factor = start_factor + (1 - start_factor) * min(k, 4) / 4
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * factor)
        for q in (big, small):
            q.grad = torch.zeros_like(q)
        opt.step()
        sched.step()
        if not (name in ("adopt", "qhadopt") and k == 0):
            expected *= 1 - factor * wd
    for q in (big, small):
        torch.testing.assert_close(q.detach(), torch.full((3,), expected), rtol=1e-6, atol=0)


def test_registry_and_builder() -> None:
    assert set(OPTIMIZERS) == {"adopt", "qhadamw", "qhadopt", "decoupled_adamw", "adamw"}
    assert OPTIMIZERS["adamw"] is torch.optim.AdamW is AdamW
    p = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer("qhadamw", [p], lr=0.5, nus=(0.5, 0.9), weight_decay=1e-4)
    assert isinstance(opt, QHAdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["nus"], group["weight_decay"], group["decouple"]) == (
        0.5, (0.5, 0.9), 1e-4, True,
    )
    assert group["foreach"] is False  # CPU parameters default to the single-tensor path
    assert isinstance(build_optimizer("decoupled_adamw", [p]), DecoupledAdamW)
    with pytest.raises(ValueError, match="expected one of adamw, adopt"):
        build_optimizer("adam", [p])
    with pytest.raises(TypeError, match="amsgrad"):
        build_optimizer("adopt", [p], amsgrad=True)
    with pytest.raises(TypeError, match="nus"):
        build_optimizer("adopt", [p], nus=(0.7, 1.0))


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("qhadamw", {"betas": (0.9, 1.0)}, "betas"),
        ("qhadamw", {"nus": (1.2, 1.0)}, "nus"),
        ("qhadopt", {"nus": (0.7, 0.9)}, "nus"),
        ("adopt", {"clip_exponent": -1.0}, "clip_exponent"),
        ("adopt", {"eps": -1.0}, "eps"),
        ("decoupled_adamw", {"lr": 0.0, "weight_decay": 1e-4}, "initial_lr"),
        ("qhadamw", {"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters_are_rejected(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, [torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_invalid_group_override_is_rejected() -> None:
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="betas"):
        QHADOPT([{"params": [p]}, {"params": [q], "betas": (1.5, 0.9)}])


def test_foreach_on_dtensor_parameters() -> None:
    """FSDP2 shards parameters as DTensors: every foreach op used must have a sharding rule."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs a fresh default process group")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for case, (name, kwargs, _) in CASES.items():
            plain = make_params()
            sharded = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
                       for p in plain]
            opts = [build_optimizer(name, ps, lr=0.01, weight_decay=0.1, foreach=True, **kwargs)
                    for ps in (plain, sharded)]
            for gs in make_grads(plain, steps=3):
                for p, s, g in zip(plain, sharded, gs):
                    p.grad, s.grad = g, distribute_tensor(g, mesh, [Shard(0)])
                for opt in opts:
                    opt.step()
            for p, s in zip(plain, sharded):
                assert torch.equal(p, s.full_tensor()), case
    finally:
        end_process_group()  # one rank: always all of them


# ---------------------------------------------------------------------------------------
# The fused (Triton) path, run on the CPU through Triton's interpreter.
# ---------------------------------------------------------------------------------------

FUSED_CASES = [case for case in CASES if CASES[case][0] != "adamw"]  # torch's own fused


@pytest.fixture
def triton_interpreter():
    """The fused kernel, re-decorated for Triton's CPU interpreter (triton.jit reads the
    variable when the module is imported), and back afterwards."""
    pytest.importorskip("triton")
    import importlib
    import os

    from fljob.trainer.optim import fused

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    importlib.reload(fused)
    yield
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous
    importlib.reload(fused)


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_matches_float64_reference_and_foreach(case: str, triton_interpreter) -> None:
    """The kernels follow the published rules (float64 references) and agree with foreach."""
    name, kwargs, reference = CASES[case]
    results = {}
    for impl in ("foreach", "fused"):
        params = make_params()
        grads = make_grads(params)
        groups = [{"params": [params[i] for i in g["idx"]],
                   **{k: v for k, v in g.items() if k != "idx"}} for g in GROUPS]
        opt = build_optimizer(name, groups, foreach=impl == "foreach", fused=impl == "fused",
                              **kwargs)
        run(opt, params, grads)
        results[impl] = (params, opt)
    start, grads = make_params(), make_grads(make_params())
    fused_params, fused_opt = results["fused"]
    for g in GROUPS:
        lrs = [g["lr"] * f for f in FACTORS]
        for i in g["idx"]:
            flat_grads = [gs[i].double().flatten().tolist() for gs in grads]
            expected = [
                reference(p0, [fg[e] for fg in flat_grads], lrs, g["lr"], g["weight_decay"],
                          g["eps"], kwargs, [])
                for e, p0 in enumerate(start[i].detach().double().flatten().tolist())
            ]
            torch.testing.assert_close(fused_params[i].detach().double().flatten(),
                                       torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-6)
    foreach_params, foreach_opt = results["foreach"]
    for a, b in zip(foreach_params, fused_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(foreach_opt.state[a][key], fused_opt.state[b][key],
                                       rtol=1e-6, atol=1e-7)
        assert torch.equal(foreach_opt.state[a]["step"], fused_opt.state[b]["step"])


def test_fused_needs_cuda_and_excludes_foreach() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="CUDA"):
        QHAdamW([p], fused=True)
    with pytest.raises(ValueError, match="foreach and fused"):
        ADOPT([p], foreach=True, fused=True)


@pytest.mark.parametrize("name", ["qhadamw", "qhadopt"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_fused_full_and_partial_blocks(name: str, offset: int, triton_interpreter) -> None:
    """Tensors longer than a block (unmasked full blocks, then a masked tail) and, with
    offset 1, a parameter 4 bytes off the allocator's alignment, all in one launch."""
    from fljob.trainer.optim import fused

    sizes = [fused.BLOCK_SIZE * 2 + 5, fused.BLOCK_SIZE, 3]
    results = []
    for impl in ("foreach", "fused"):
        gen = torch.Generator().manual_seed(0)
        storage = torch.randn(sum(sizes) + offset, generator=gen)
        params = [torch.nn.Parameter(p) for p in storage[offset:].split(sizes)]
        opt = build_optimizer(name, params, lr=0.01, weight_decay=0.1, foreach=impl == "foreach",
                              fused=impl == "fused")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append(params)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled kernel)")
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_equals_foreach_on_cuda(case: str) -> None:
    """The compiled kernel, not the interpreter: full blocks, tails, an unaligned parameter
    and two param groups, over several scheduled steps."""
    from fljob.trainer.optim import fused

    name, kwargs, _ = CASES[case]
    sizes = [fused.BLOCK_SIZE * 3 + 7, fused.BLOCK_SIZE, 5, 64 * 64]
    results = []
    for impl in ("foreach", "fused"):
        gen = torch.Generator().manual_seed(0)
        storage = torch.randn(sum(sizes) + 1, generator=gen).cuda()
        params = [torch.nn.Parameter(p) for p in storage[1:].split(sizes)]
        groups = [{"params": params[:2], "lr": 0.03, "weight_decay": 0.05, "eps": 1e-3},
                  {"params": params[2:], "lr": 0.01, "weight_decay": 0.2, "eps": 1e-8}]
        opt = build_optimizer(name, groups, foreach=impl == "foreach", fused=impl == "fused",
                              **kwargs)
        sched = LambdaLR(opt, lambda k: FACTORS[k % len(FACTORS)])
        for k in range(6):
            for p in params:
                p.grad = (20.0 if k == 2 else 1.0) * torch.randn(p.shape, generator=gen).cuda()
            opt.step()
            sched.step()
        results.append((params, opt))
    (p_ref, o_ref), (p_fused, o_fused) = results
    for a, b in zip(p_ref, p_fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o_ref.state[a][key], o_fused.state[b][key],
                                       rtol=1e-5, atol=1e-6)
