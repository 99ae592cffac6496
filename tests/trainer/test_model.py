"""Tests of the muP Llama: shapes, sizes, muP init and multipliers, param groups, HF
conversion, training, and 2-process FSDP/TP equivalence over gloo."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fljob.trainer.model.args import ModelArgs
from fljob.trainer.model.flavors import (
    DEFAULT_VOCAB_SIZE,
    FLAVOR_NAMES,
    FLAVORS,
    TINY_FLAVOR,
    format_param_count,
    get_flavor,
    with_shape,
)
from fljob.trainer.model.model import MuPTransformer
from fljob.trainer.model.mup import (
    GROUP_NAMES,
    WEIGHT_DECAY_MODES,
    group_scales,
    mup_param_groups,
)
from fljob.trainer.process_group import end_process_group

HIDDEN_SUFFIXES = ("wq.weight", "wk.weight", "wv.weight", "wo.weight",
                   "w1.weight", "w2.weight", "w3.weight")
RESIDUAL_FAN_IN_SUFFIXES = tuple(s for s in HIDDEN_SUFFIXES if s != "w2.weight")


def small_args(**overrides: object) -> ModelArgs:
    """A CPU-fast model with GQA, both extra norms and non-trivial muP multipliers."""
    base: dict[str, object] = {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256,
        "ffn_multiple_of": 64, "max_seq_len": 32, "base_dim": 32, "base_depth": 1,
        "use_embedding_norm": True, "use_peri_norm": True, "input_alpha": 2.0,
        "output_alpha": 1.5, "depth_alpha": 0.5,
    }
    base.update(overrides)
    return ModelArgs(**base)  # type: ignore[arg-type]


def build(args: ModelArgs, seed: int = 0) -> MuPTransformer:
    torch.manual_seed(seed)
    model = MuPTransformer(args)
    model.init_weights()
    return model


def unique_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- shapes and sizes ----------------------------------------------------------------

def test_forward_shape_and_backward() -> None:
    args = small_args()
    model = build(args)
    tokens = torch.randint(0, args.vocab_size, (3, 20))
    logits = model(tokens)
    assert logits.shape == (3, 20, args.vocab_size)
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_causal() -> None:
    model = build(small_args())
    tokens = torch.randint(0, 256, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    with torch.no_grad():
        assert torch.equal(model(tokens)[0, :10], model(changed)[0, :10])
        assert not torch.allclose(model(tokens)[0, 10:], model(changed)[0, 10:])


@pytest.mark.parametrize("name", FLAVOR_NAMES)
def test_flavor_named_by_real_param_count(name: str) -> None:
    args = get_flavor(name)
    with torch.device("meta"):
        model = MuPTransformer(args)
    count = unique_param_count(model)
    assert count == args.num_params()
    assert format_param_count(count) == name
    assert args.vocab_size == DEFAULT_VOCAB_SIZE
    assert args.head_dim == 64 or name == TINY_FLAVOR  # fixed: muP-consistent attention
    assert args.dim % 128 == 0 or name == TINY_FLAVOR


def test_flavor_range_and_tiny_size() -> None:
    counts = [FLAVORS[n].num_params() for n in FLAVOR_NAMES]
    assert counts == sorted(counts)
    assert 2e5 <= counts[0] <= 2e6
    assert any(110e6 <= c <= 140e6 for c in counts)
    assert 0.9e9 <= counts[-1] <= 1.2e9


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_formula_matches_model(tied: bool) -> None:
    for peri, emb in ((False, False), (True, True)):
        args = small_args(tie_word_embeddings=tied, use_peri_norm=peri, use_embedding_norm=emb)
        with torch.device("meta"):
            assert unique_param_count(MuPTransformer(args)) == args.num_params()


def test_ffn_hidden_is_the_8_3_rule() -> None:
    # The original's multiplier bug gave 2816 for dim 256; 8/3 rounded up is 768.
    assert ModelArgs(dim=256).ffn_hidden_dim == 768
    assert ModelArgs(dim=768, n_heads=12).ffn_hidden_dim == 2048
    assert ModelArgs(dim=2048, n_heads=16).ffn_hidden_dim == 5632
    assert ModelArgs(dim=64, ffn_multiple_of=64).ffn_hidden_dim == 192


def test_format_param_count() -> None:
    assert format_param_count(1_246_336) == "1.25M"
    assert format_param_count(125_879_808) == "126M"
    assert format_param_count(999_999) == "1.00M"
    assert format_param_count(35_668_992) == "35.7M"
    assert format_param_count(1_061_326_848) == "1.06B"


def test_get_flavor_copies_and_overrides() -> None:
    args = get_flavor(TINY_FLAVOR, vocab_size=512)
    args.max_seq_len = 7
    assert args.vocab_size == 512
    assert FLAVORS[TINY_FLAVOR].max_seq_len != 7
    with pytest.raises(KeyError, match="known"):
        get_flavor("16M")


@pytest.mark.parametrize("bad", [{"dim": 65}, {"n_kv_heads": 3}, {"attn_scaling": "x"},
                                 {"depth_alpha": 1.5}, {"dim": 12, "n_heads": 4}])
def test_args_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        small_args(**bad)


def test_nparams_and_flops() -> None:
    args = small_args(tie_word_embeddings=True)
    model = build(args)
    nparams, flops = args.get_nparams_and_flops(model, 32)
    assert nparams == args.num_params() == unique_param_count(model)
    assert args.get_nparams_and_flops(None, 32)[0] == nparams
    matmul = args.n_layers * args.block_matrix_params + args.vocab_size * args.dim
    assert flops == 6 * matmul + 12 * args.n_layers * args.n_heads * args.head_dim * 32


def test_update_from_config_sizes_rope_and_rejects_cp_pp() -> None:
    from torchtitan.config import JobConfig

    args, job_config = small_args(), JobConfig()
    job_config.training.seq_len = 48
    args.update_from_config(job_config)
    assert args.max_seq_len == 48
    assert MuPTransformer(args).rope_cos.shape == (48, args.head_dim)
    for field in ("context_parallel_degree", "pipeline_parallel_degree"):
        job_config = JobConfig()
        setattr(job_config.parallelism, field, 2)
        with pytest.raises(NotImplementedError):
            args.update_from_config(job_config)


def test_args_and_flavors_import_without_torch() -> None:
    code = ("import sys, fljob.trainer.model.flavors as f; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(f.TINY_FLAVOR)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == TINY_FLAVOR


# ---- muP init and multipliers ----------------------------------------------------------

@pytest.mark.parametrize("mup", [True, False])
def test_init_stds(mup: bool) -> None:
    # m = 4: hidden std 0.02/2 under muP, 0.02 under SP; embedding/output width-free.
    # w2 reads the FFN width, 768 here against 256 at the base (8/3 * 64 rounded up to
    # 256): m_ffn = 3, so its std is 0.02/sqrt(3).
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=4096, base_dim=64,
                     use_embedding_norm=True, use_peri_norm=True, mup_enabled=mup,
                     init_std=0.02, emb_init_std=0.05)
    assert (args.width_mult, args.ffn_width_mult) == (4.0, 3.0)
    model = build(args)
    expected_hidden = 0.01 if mup else 0.02
    expected_w2 = 0.02 / math.sqrt(3) if mup else 0.02
    assert math.isclose(args.hidden_init_std, expected_hidden)
    assert math.isclose(args.ffn_out_init_std, expected_w2)
    for name, p in model.named_parameters():
        if name.endswith(HIDDEN_SUFFIXES):
            expected = expected_w2 if name.endswith("w2.weight") else expected_hidden
            assert p.std().item() == pytest.approx(expected, rel=0.02), name
            assert abs(p.mean().item()) < 0.1 * expected, name
        elif name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.05, rel=0.02)
    assert model.output.weight.std().item() == pytest.approx(0.02, rel=0.02)


def test_zero_init_readout_and_query() -> None:
    """Tensor Programs V's zero readout and query: logits 0 and uniform attention at init,
    the other weights as without the flags (same seed), and both matrices learn at once."""
    args = small_args(zero_init_readout=True, zero_init_query=True)
    model, plain = build(args), build(dataclasses.replace(args, zero_init_readout=False,
                                                            zero_init_query=False))
    zeroed = {"output.weight"} | {n for n, _ in model.named_parameters() if n.endswith("wq.weight")}
    assert len(zeroed) == 1 + args.n_layers
    reference = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if name in zeroed:
            assert not p.any(), name
            assert reference[name].any(), name
        else:
            assert torch.equal(p, reference[name]), name
    tokens = torch.randint(0, 256, (2, 16))
    logits = model(tokens)
    assert not logits.detach().any()
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert model.output.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="untied"):
        small_args(zero_init_readout=True, tie_word_embeddings=True)


def test_mup_equals_sp_at_base_shape() -> None:
    # At m = L = 1 with unit alphas and standard attention, muP and SP are one model.
    args = small_args(base_dim=64, base_depth=2, input_alpha=1.0, output_alpha=1.0)
    assert args.width_mult == args.depth_mult == 1.0
    tokens = torch.randint(0, 256, (2, 16))
    mup, sp = build(args, seed=3), build(dataclasses.replace(args, mup_enabled=False), seed=3)
    with torch.no_grad():
        assert torch.equal(mup(tokens), sp(tokens))


def test_output_multiplier() -> None:
    # m = 2 and output_alpha = 1.5: logits are exactly 0.75x those of the same weights in SP.
    args = small_args(base_depth=2, input_alpha=1.0)
    assert args.output_mult == pytest.approx(0.75)
    mup = build(args)
    sp = MuPTransformer(dataclasses.replace(args, mup_enabled=False))
    sp.load_state_dict(mup.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(mup(tokens), 0.75 * sp(tokens), rtol=1e-5, atol=1e-6)


def test_input_multiplier() -> None:
    args = small_args(use_embedding_norm=False)
    model = build(args)
    seen: list[torch.Tensor] = []
    model.layers["0"].register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        model(tokens)
        torch.testing.assert_close(seen[0], 2.0 * model.tok_embeddings(tokens))


def test_residual_branch_depth_multiplier() -> None:
    # L = 2 / 1, alpha = 0.5: each branch is scaled by 2^-0.5 before the residual add.
    args = small_args()
    assert args.residual_mult == pytest.approx(2 ** -0.5)
    model = build(args)
    block = model.layers["0"]
    nn.init.zeros_(block.feed_forward.w2.weight)  # leaves only the attention branch
    unscaled = MuPTransformer(dataclasses.replace(args, depth_scaling=False)).layers["0"]
    unscaled.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, args.dim)
    with torch.no_grad():
        scaled_branch = block(x, model.rope_cos, model.rope_sin) - x
        plain_branch = unscaled(x, model.rope_cos, model.rope_sin) - x
    torch.testing.assert_close(scaled_branch, args.residual_mult * plain_branch)


def test_mup_attention_scale_is_one_over_head_dim() -> None:
    # 1/d attention equals standard 1/sqrt(d) attention with q scaled by 1/sqrt(d).
    args = small_args(attn_scaling="mup")
    assert args.attn_scale == 1 / args.head_dim
    mup = build(args)
    std = MuPTransformer(dataclasses.replace(args, attn_scaling="standard"))
    state = mup.state_dict()
    for key in [k for k in state if k.endswith("wq.weight")]:
        state[key] = state[key] / math.sqrt(args.head_dim)
    std.load_state_dict(state)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(mup(tokens), std(tokens), rtol=1e-5, atol=1e-6)


def test_block_compiles_without_graph_breaks() -> None:
    # torchtitan's apply_compile uses fullgraph=True per block: a graph break would fail.
    args = small_args(attn_scaling="mup")
    model = build(args)
    block = model.layers["0"]
    x = torch.randn(2, 16, args.dim)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, model.rope_cos, model.rope_sin),
                               block(x, model.rope_cos, model.rope_sin))


# ---- parameter groups -----------------------------------------------------------------

def groups_by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def test_param_group_membership() -> None:
    args = small_args()
    model = build(args)
    groups = groups_by_name(mup_param_groups(model, args, lr=1e-3, weight_decay=0.1, eps=1e-8,
                                             weight_decay_mode="decoupled"))
    assert set(groups) == set(GROUP_NAMES)
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    named = dict(model.named_parameters())
    assert ids["embedding"] == {id(model.tok_embeddings.weight)}
    assert ids["output"] == {id(model.output.weight)}
    assert ids["vector"] == {id(model.norm.weight), id(model.embedding_norm.weight)}
    assert ids["hidden"] == {id(p) for n, p in named.items()
                             if n.endswith(RESIDUAL_FAN_IN_SUFFIXES)}
    assert len(ids["hidden"]) == 6 * args.n_layers
    assert ids["hidden_ffn_out"] == {id(model.layers[str(i)].feed_forward.w2.weight)
                                     for i in range(args.n_layers)}
    assert len(ids["hidden_vector"]) == 4 * args.n_layers
    assert sum(len(s) for s in ids.values()) == len(named)


@pytest.mark.parametrize("mode", WEIGHT_DECAY_MODES)
def test_param_group_multipliers(mode: str) -> None:
    # m = 2, L = 2, alpha = 0.5; FFN width 192 against 128 at the base: m_ffn = 1.5.
    args = small_args()
    assert args.ffn_width_mult == 1.5
    lr, wd, eps = 1e-3, 0.1, 1e-8
    groups = groups_by_name(mup_param_groups(build(args), args, lr=lr, weight_decay=wd, eps=eps,
                                             weight_decay_mode=mode))
    m, m_ffn, depth = 2.0, 1.5, 2.0
    block_lr, block_eps = lr * depth ** -0.5, eps / (m * depth ** 0.5)
    expected = {
        "embedding": (lr, eps / m),
        "output": (lr, eps / m),
        "hidden": (block_lr / m, block_eps),
        "hidden_ffn_out": (block_lr / m_ffn, block_eps),
        "hidden_vector": (block_lr, block_eps),
        "vector": (lr, eps / m),
    }
    for name, (e_lr, e_eps) in expected.items():
        assert (groups[name]["lr"], groups[name]["eps"]) == pytest.approx((e_lr, e_eps)), name
    assert groups["hidden_vector"]["weight_decay"] == groups["vector"]["weight_decay"] == 0.0
    # Each mode's per-step decay rate is the same for every decayed group (and = base).
    decayed = [groups[n] for n in ("embedding", "output", "hidden", "hidden_ffn_out")]
    rate = {"decoupled": lambda g: g["weight_decay"],
            "lr_coupled": lambda g: g["lr"] * g["weight_decay"],
            "l2": lambda g: g["lr"] * g["weight_decay"] / g["eps"]}[mode]
    base_rate = {"decoupled": wd, "lr_coupled": lr * wd, "l2": lr * wd / eps}[mode]
    assert [rate(g) for g in decayed] == pytest.approx([base_rate] * len(decayed))
    if mode == "lr_coupled":  # CompleteP's wd * m for hidden matrices (here with L^(1-a))
        assert groups["hidden"]["weight_decay"] == pytest.approx(wd * m * depth ** 0.5)


def test_param_groups_reject_unknown_weight_decay_mode() -> None:
    args = small_args()
    with pytest.raises(ValueError, match="weight_decay_mode"):
        mup_param_groups(build(args), args, lr=1e-3, weight_decay=0.1, eps=1e-8,
                         weight_decay_mode="adamw")  # type: ignore[arg-type]


def group_grad_rms(args: ModelArgs) -> dict[str, float]:
    """Gradient RMS of every param group after one cross-entropy backward on fixed tokens."""
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    model = build(args, seed=1)
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    groups = mup_param_groups(model, args, lr=1.0, weight_decay=0.0, eps=1.0,
                              weight_decay_mode="decoupled")
    return {g["name"]: torch.cat([p.grad.flatten() for p in g["params"]]).pow(2).mean()
            .sqrt().item() for g in groups}


def grad_test_args(dim: int, **overrides: object) -> ModelArgs:
    return small_args(dim=dim, n_heads=dim // 16, n_kv_heads=None, base_dim=64, base_depth=2,
                      input_alpha=1.0, output_alpha=1.0, **overrides)


@pytest.mark.parametrize("mup", [True, False])
def test_gradient_entries_scale_as_one_over_width(mup: bool) -> None:
    # The premise of the eps rule: under muP the gradient RMS of every group falls as 1/m
    # (the 1/m logit multiplier is on every backward path), and so does each group's eps;
    # under SP it does not.
    narrow_args, wide_args = grad_test_args(64, mup_enabled=mup), grad_test_args(512, mup_enabled=mup)
    narrow, wide = group_grad_rms(narrow_args), group_grad_rms(wide_args)
    eps_narrow = group_scales(narrow_args, weight_decay_mode="decoupled")
    eps_wide = group_scales(wide_args, weight_decay_mode="decoupled")
    for name in GROUP_NAMES:
        ratio = wide[name] / narrow[name]
        if mup:
            assert eps_wide[name].eps / eps_narrow[name].eps == pytest.approx(1 / 8), name
            assert ratio == pytest.approx(1 / 8, rel=0.15), name
        else:  # SP: hidden gradients fall as about 1/sqrt(m), the others not at all
            assert ratio > 2 / 8, name


def test_ffn_output_gradient_follows_dim_not_ffn_width() -> None:
    # w2's lr follows its fan-in (the FFN width) but its eps the dim ratio: its gradient is
    # the FFN output's gradient (size 1/m) times a hidden activation (size 1). Widths 128
    # -> 512 with FFN widths 512 -> 1536 (8/3 dim rounded up to 256): m grows 4x, m_ffn 3x.
    narrow_args, wide_args = (grad_test_args(d, ffn_multiple_of=256) for d in (128, 512))
    assert wide_args.ffn_width_mult / narrow_args.ffn_width_mult == 3.0
    ratio = group_grad_rms(wide_args)["hidden_ffn_out"] / group_grad_rms(narrow_args)["hidden_ffn_out"]
    assert ratio == pytest.approx(1 / 4, rel=0.08)  # measured 0.248 and 0.254 for two seeds
    narrow, wide = (group_scales(a, weight_decay_mode="decoupled")["hidden_ffn_out"]
                    for a in (narrow_args, wide_args))
    assert (wide.eps / narrow.eps, wide.lr / narrow.lr) == pytest.approx((1 / 4, 1 / 3))


@pytest.mark.parametrize("mup", [True, False])
def test_ffn_output_matrix_follows_its_own_fan_in(mup: bool) -> None:
    # The 7.61M base at widths 128 and 384: FFN widths 512 and 1024 (8/3 dim rounded up to
    # 256) against 768 at the base width 256, so w2's fan-in ratio m_ffn is 2/3 and 4/3
    # where m is 1/2 and 3/2. w2's init std and Adam lr follow m_ffn, the other hidden
    # matrices m; in SP all are the base values.
    lr, eps = 1e-3, 1e-8
    for width, m, m_ffn in ((128, 0.5, 2 / 3), (384, 1.5, 4 / 3)):
        args = with_shape(get_flavor("7.61M", vocab_size=256, mup_enabled=mup), width=width)
        assert (args.width_mult, args.ffn_width_mult) == pytest.approx((m, m_ffn))
        if not mup:
            m = m_ffn = 1.0
        model = build(args)
        for name, p in model.named_parameters():
            if name.endswith(HIDDEN_SUFFIXES):
                fan_in_mult = m_ffn if name.endswith("w2.weight") else m
                assert p.std().item() == pytest.approx(0.02 / math.sqrt(fan_in_mult),
                                                       rel=0.03), (width, name)
        groups = groups_by_name(mup_param_groups(model, args, lr=lr, weight_decay=0.1, eps=eps,
                                                 weight_decay_mode="lr_coupled"))
        assert groups["hidden_ffn_out"]["lr"] == pytest.approx(lr / m_ffn)
        assert groups["hidden"]["lr"] == pytest.approx(lr / m)
        assert groups["hidden_ffn_out"]["eps"] == groups["hidden"]["eps"] == pytest.approx(eps / m)
        # lr-coupled decay: the same per-step decay rate as at the base shape.
        assert groups["hidden_ffn_out"]["weight_decay"] == pytest.approx(0.1 * m_ffn)


def test_param_groups_standard_parametrisation() -> None:
    args = small_args(mup_enabled=False)
    groups = mup_param_groups(build(args), args, lr=1e-3, weight_decay=0.1, eps=1e-8,
                              weight_decay_mode="lr_coupled")
    assert {g["lr"] for g in groups} == {1e-3}
    assert {g["eps"] for g in groups} == {1e-8}
    assert {g["name"]: g["weight_decay"] for g in groups} == {
        "embedding": 0.1, "output": 0.1, "hidden": 0.1, "hidden_ffn_out": 0.1,
        "hidden_vector": 0.0, "vector": 0.0}


def test_group_scales_are_identity_at_base_shape() -> None:
    for mode in WEIGHT_DECAY_MODES:
        scales = group_scales(small_args(base_dim=64, base_depth=2), weight_decay_mode=mode)
        assert {s.lr for s in scales.values()} == {s.eps for s in scales.values()} == {1.0}
        assert {s.weight_decay for s in scales.values()} == {0.0, 1.0}


def test_tied_weight_counted_once_in_embedding_group() -> None:
    args = small_args(tie_word_embeddings=True)
    model = build(args)
    assert model.output.weight is model.tok_embeddings.weight
    groups = groups_by_name(mup_param_groups(model, args, lr=1e-3, weight_decay=0.0, eps=1e-8,
                                             weight_decay_mode="decoupled"))
    assert "output" not in groups
    assert [id(p) for p in groups["embedding"]["params"]] == [id(model.tok_embeddings.weight)]
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_param_groups_through_compile_and_checkpoint_wrappers() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    args = small_args()
    model = build(args)
    plain = mup_param_groups(model, args, lr=1e-3, weight_decay=0.1, eps=1e-8,
                             weight_decay_mode="decoupled")
    model.layers["0"] = torch.compile(checkpoint_wrapper(model.layers["0"]))
    model.layers["1"] = checkpoint_wrapper(model.layers["1"])
    names = [n for n, _ in model.named_parameters()]
    assert any("_orig_mod._checkpoint_wrapped_module" in n for n in names)
    wrapped = mup_param_groups(model, args, lr=1e-3, weight_decay=0.1, eps=1e-8,
                               weight_decay_mode="decoupled")
    assert [(g["name"], [id(p) for p in g["params"]]) for g in wrapped] == \
        [(g["name"], [id(p) for p in g["params"]]) for g in plain]


def test_param_groups_reject_uncovered_and_skip_frozen() -> None:
    args = small_args()
    model = build(args)
    model.extra_scale = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="extra_scale"):
        mup_param_groups(model, args, lr=1e-3, weight_decay=0.1, eps=1e-8,
                         weight_decay_mode="decoupled")
    model.extra_scale.requires_grad_(False)
    model.norm.weight.requires_grad_(False)
    groups = groups_by_name(mup_param_groups(model, args, lr=1e-3, weight_decay=0.1, eps=1e-8,
                                             weight_decay_mode="decoupled"))
    assert [id(p) for p in groups["vector"]["params"]] == [id(model.embedding_norm.weight)]


# ---- Hugging Face conversion ------------------------------------------------------------

def hf_args(**overrides: object) -> ModelArgs:
    """Exportable: no extra norms; muP multipliers all != 1 so folding is exercised."""
    return small_args(use_embedding_norm=False, use_peri_norm=False, attn_scaling="mup",
                      **overrides)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_round_trip(tied: bool) -> None:
    from fljob.trainer.model.state_dict_adapter import MuPLlamaStateDictAdapter

    args = hf_args(tie_word_embeddings=tied, input_alpha=1.0 if tied else 2.0)
    model = build(args)
    adapter = MuPLlamaStateDictAdapter(args, None)
    state = model.state_dict()
    hf = adapter.to_hf(state)
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | (
        set() if tied else {"lm_head.weight"})
    for i in range(args.n_layers):
        expected |= {f"model.layers.{i}.{k}" for k in (
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")}
    assert set(hf) == expected
    back = adapter.from_hf(hf)
    assert set(back) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, rtol=1e-6, atol=0)
    fresh = MuPTransformer(args)
    fresh.load_state_dict(back)
    assert (fresh.output.weight is fresh.tok_embeddings.weight) == tied


def titan_llama(args: ModelArgs) -> tuple[nn.Module, object]:
    """torchtitan's own Llama3 with the same shapes and no RoPE scaling."""
    from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs
    from torchtitan.models.llama3.model.model import Transformer

    titan_args = TransformerModelArgs(
        dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
        vocab_size=args.vocab_size, multiple_of=args.ffn_multiple_of, norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, max_seq_len=args.max_seq_len,
        rope_scaling_args=RoPEScalingArgs(scaling_factor=1.0))
    model = Transformer(titan_args)
    with torch.no_grad():
        model.init_weights()
    return model, titan_args


def test_hf_export_and_import_match_torchtitan_llama3() -> None:
    # torchtitan's Llama3 adapter is an independent HF converter (with its own q/k
    # permutation): our folded export must load into it and give the same logits, and
    # an HF checkpoint it writes must load into our muP model and give the same logits.
    from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

    from fljob.trainer.model.state_dict_adapter import MuPLlamaStateDictAdapter

    args = hf_args()
    ours = build(args)
    titan, titan_args = titan_llama(args)
    assert titan.layers["0"].feed_forward.w1.weight.shape[0] == args.ffn_hidden_dim
    ours_adapter = MuPLlamaStateDictAdapter(args, None)
    titan_adapter = Llama3StateDictAdapter(titan_args, None)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    with torch.no_grad():
        titan.load_state_dict(titan_adapter.from_hf(ours_adapter.to_hf(ours.state_dict())))
        torch.testing.assert_close(titan(tokens), ours(tokens), rtol=1e-4, atol=1e-5)
        titan.init_weights()
        ours.load_state_dict(ours_adapter.from_hf(titan_adapter.to_hf(titan.state_dict())))
        torch.testing.assert_close(ours(tokens), titan(tokens), rtol=1e-4, atol=1e-5)


def test_hf_rejects_what_llama_cannot_express() -> None:
    from fljob.trainer.model.state_dict_adapter import MuPLlamaStateDictAdapter

    for args in (small_args(), hf_args(tie_word_embeddings=True)):
        adapter = MuPLlamaStateDictAdapter(args, None)
        with pytest.raises(ValueError, match="Hugging Face"):
            adapter.to_hf(build(args).state_dict())


# ---- training ----------------------------------------------------------------------------

def test_tiny_flavor_trains_with_mup_groups() -> None:
    args = get_flavor(TINY_FLAVOR, vocab_size=512, max_seq_len=64)
    model = build(args)
    groups = mup_param_groups(model, args, lr=3e-3, weight_decay=0.01, eps=1e-8,
                              weight_decay_mode="lr_coupled")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    # A deterministic successor rule: next = (7 * token + 3) mod 512, learnable in a few steps.
    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, 512, (4, 1), generator=gen)
    seq = [start]
    for _ in range(32):
        seq.append((7 * seq[-1] + 3) % 512)
    tokens = torch.cat(seq, dim=1)
    losses = []
    for _ in range(20):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(512), rel=0.1)
    assert losses[-1] < 0.5 * losses[0]


# ---- distributed: 2 processes over gloo -----------------------------------------------

def _distributed_worker(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel
    from torchtitan.config import JobConfig

    from fljob.trainer.model.parallelize import parallelize_mup_llama

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    # torchtitan 0.2.2 picks its mesh device once at import ("cuda" without an accelerator).
    parallel_dims_module.device_type = "cpu"
    try:
        # (tied, dp_replicate, dp_shard, tp): FSDP tied/untied, DDP tied, TP tied.
        for tied, ddp, dp, tp in ((True, 1, 2, 1), (False, 1, 2, 1), (True, 2, 1, 1),
                                  (True, 1, 1, 2)):
            case = f"dp_replicate={ddp} dp_shard={dp} tp={tp} tied={tied}"
            args = small_args(tie_word_embeddings=tied, max_seq_len=16)
            reference = build(args)
            full_state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
            tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            ref_loss = F.cross_entropy(reference(inputs).flatten(0, 1), labels.flatten())
            ref_loss.backward()

            job_config = JobConfig()
            job_config.training.seq_len = 16
            job_config.training.mixed_precision_param = "float32"  # exact comparison
            dims = parallel_dims_module.ParallelDims(
                dp_replicate=ddp, dp_shard=dp, cp=1, tp=tp, pp=1, ep=1, etp=1, world_size=world)
            with torch.device("meta"):
                model = MuPTransformer(args)
            model = parallelize_mup_llama(model, dims, job_config)  # default: selective AC
            model.to_empty(device="cpu")
            model.init_weights()  # the torchtitan meta-init flow, on DTensors
            assert (model.output.weight is model.tok_embeddings.weight) == tied
            set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True))

            if tp == 1:  # each rank its half of the batch; loss normalised by global tokens
                rows = slice(rank * 2, rank * 2 + 2)
                logits = model(inputs[rows])
                loss = F.cross_entropy(logits.flatten(0, 1), labels[rows].flatten(),
                                       reduction="sum") / labels.numel()
                loss.backward()
                total = loss.detach().clone()
                dist.all_reduce(total)
            else:  # TP ranks see the same batch; logits sharded on vocab (loss parallel)
                with loss_parallel():
                    loss = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
                    loss.backward()
                total = loss.full_tensor()
            torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-5, atol=1e-6)
            reference_params = dict(reference.named_parameters())
            for name, param in model.named_parameters():
                grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
                ref_grad = reference_params[name.replace("_checkpoint_wrapped_module.", "")].grad
                torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, n=name, c=case: f"{n} {c}: {m}")
    except BaseException:
        end_process_group(all_ranks_here=False)
        raise
    end_process_group()


@pytest.mark.slow
def test_fsdp_and_tp_match_single_process(tmp_path: os.PathLike) -> None:
    """2-rank gloo: FSDP (tied and untied), DDP and TP (tied, all extra norms) forward
    and backward equal one process on the whole batch, with the trainer's meta-init flow
    and its loss normalisation (local sum / global token count)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store")), nprocs=2)
