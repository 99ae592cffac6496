"""Registered model flavors, each named by its real parameter count.

Counts are for ``DEFAULT_VOCAB_SIZE`` (the project's BPE tokenizer size). A job that
sets another vocabulary gets another count: ``ModelArgs.num_params()`` is the truth,
the name is a label for the default. ``tests/trainer/test_model.py`` asserts that every
name equals ``format_param_count`` of the count of the model as built.

All flavors share one muP base (width 256, depth 4, the "7.61M" flavor), so
hyperparameters tuned on the base transfer to every other flavor. They use the norms the
research runs used (embedding norm and peri-norms) and untied embeddings (see MUP.md).
Widths are multiples of 128 and head_dim is 64 (the head count grows with width, so
the attention logit scale is the base model's whatever ``attn_scaling`` says), except for
the CPU-sized tiny flavor.

Torch-free, like ``args``: the job spec may import it to validate a flavor name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from fljob.trainer.model.args import ModelArgs

if TYPE_CHECKING:
    from fljob.spec.models import JobSpec

DEFAULT_VOCAB_SIZE = 8192
BASE_DIM = 256
BASE_DEPTH = 4


def format_param_count(n: int) -> str:
    """Three significant digits with a K/M/B suffix: 1246336 -> '1.25M'."""
    rounded = float(f"{n:.3g}")
    for suffix, unit in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if rounded >= unit:
            value = rounded / unit
            return f"{value:.{max(0, 2 - int(math.log10(value)))}f}{suffix}"
    return str(n)


def _flavor(dim: int, n_layers: int, n_heads: int, **overrides: object) -> ModelArgs:
    common: dict[str, object] = {
        "vocab_size": DEFAULT_VOCAB_SIZE, "base_dim": BASE_DIM, "base_depth": BASE_DEPTH,
        "use_embedding_norm": True, "use_peri_norm": True, "tie_word_embeddings": False,
    }
    common.update(overrides)
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, **common)  # type: ignore[arg-type]


_ARGS: tuple[ModelArgs, ...] = (
    # CPU-sized: trains 50 steps on 2 cores in seconds; GQA (4 query, 2 kv heads).
    _flavor(64, 4, 4, n_kv_heads=2, ffn_multiple_of=64),
    # The muP base model (m = 1, L = 1): tune hyperparameters here.
    _flavor(256, 4, 4),
    _flavor(512, 8, 8),
    _flavor(768, 16, 12),
    _flavor(1024, 24, 16),
    _flavor(2048, 20, 32),
)

FLAVORS: dict[str, ModelArgs] = {format_param_count(a.num_params()): a for a in _ARGS}
FLAVOR_NAMES: tuple[str, ...] = tuple(FLAVORS)
TINY_FLAVOR = FLAVOR_NAMES[0]


def get_flavor(name: str, **overrides: object) -> ModelArgs:
    """A fresh copy of a flavor's args (torchtitan mutates them), with field overrides.

    ``get_flavor("1.25M", vocab_size=tokenizer.vocab_size)`` is the usual call.
    """
    try:
        args = FLAVORS[name]
    except KeyError:
        raise KeyError(f"unknown model flavor {name!r}; known: {', '.join(FLAVOR_NAMES)}") from None
    return dataclasses.replace(args, **overrides)


def with_shape(args: ModelArgs, *, width: int | None = None, depth: int | None = None) -> ModelArgs:
    """``args`` at another width and/or depth, with the muP base shape unchanged.

    The width keeps the flavor's ``head_dim`` and query:KV head ratio (the head count
    follows) and its FFN rule (``ffn_ratio`` rounded up to ``ffn_multiple_of``); ``m`` and
    ``L`` stay relative to ``base_dim``/``base_depth``. ValueError names a width the heads
    cannot make.
    """
    changes: dict[str, object] = {}
    if width is not None and width != args.dim:
        head_dim = args.head_dim
        if width <= 0 or width % head_dim:
            raise ValueError(f"width {width} is not a positive multiple of the flavor's head_dim "
                             f"{head_dim}")
        n_heads = width // head_dim
        kv_heads, rest = divmod(n_heads * args.kv_heads, args.n_heads)
        if rest or kv_heads == 0:
            raise ValueError(f"width {width} gives {n_heads} heads, which cannot keep the flavor's "
                             f"{args.n_heads}:{args.kv_heads} query:KV head ratio; use a multiple "
                             f"of {head_dim * args.n_heads // math.gcd(args.n_heads, args.kv_heads)}")
        changes.update(dim=width, n_heads=n_heads, n_kv_heads=None if kv_heads == n_heads else kv_heads)
    if depth is not None:
        if depth <= 0:
            raise ValueError(f"depth must be positive, got {depth}")
        changes["n_layers"] = depth
    return dataclasses.replace(args, **changes) if changes else dataclasses.replace(args)


def flavor_name(spec: JobSpec) -> str:
    """The spec's flavor; "tiny" (the spec's default) names the smallest registered one."""
    return TINY_FLAVOR if spec.model.flavor == "tiny" else spec.model.flavor


def args_for_spec(spec: JobSpec, vocab_size: int) -> ModelArgs:
    """The flavor's arguments at the spec's width and depth, with its muP settings and the
    tokenizer's vocabulary."""
    m = spec.model
    shaped = with_shape(get_flavor(flavor_name(spec)), width=m.width, depth=m.depth)
    return dataclasses.replace(
        shaped,
        vocab_size=vocab_size,
        mup_enabled=m.mup,
        attn_scaling=m.attention_scale,
        input_alpha=m.input_alpha,
        output_alpha=m.output_alpha,
        depth_alpha=m.depth_alpha_exp,
        init_std=m.init_std,
        zero_init_readout=m.zero_init_readout,
        zero_init_query=m.zero_init_query,
        tie_word_embeddings=m.tie_embeddings,
        use_embedding_norm=shaped.use_embedding_norm if m.embedding_norm is None else m.embedding_norm,
        use_peri_norm=shaped.use_peri_norm if m.peri_norm is None else m.peri_norm,
    )
