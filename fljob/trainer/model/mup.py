"""muP / CompleteP optimizer parameter groups: per-group lr, weight decay and Adam eps.

With m = dim/base_dim, m_ffn = ffn_hidden_dim/base_ffn_hidden_dim (the FFN width does not
grow exactly like dim: it is rounded up to ffn_multiple_of), L = n_layers/base_depth,
a = depth_alpha (MUP.md derives them):

| group          | members                                  | lr                | eps         |
|----------------|------------------------------------------|-------------------|-------------|
| embedding      | tok_embeddings.weight (+ output if tied) | lr                | eps/m       |
| output         | output.weight (untied only)              | lr                | eps/m       |
| hidden         | wq wk wv wo w1 w3 (fan-in dim)           | lr*L^(a-1)/m      | eps/(m L^a) |
| hidden_ffn_out | w2 (fan-in the FFN width)                | lr*L^(a-1)/m_ffn  | eps/(m L^a) |
| hidden_vector  | block norm gains                         | lr*L^(a-1)        | eps/(m L^a) |
| vector         | embedding_norm, final norm gains         | lr                | eps/m       |

A hidden matrix's Adam lr follows its own fan-in ratio (as in microsoft/mup's base
shapes). eps follows each group's gradient-entry scale: 1/m everywhere (w2's gradient is
the outer product of the FFN output's gradient, of size 1/m, with a hidden activation of
size 1), times the residual multiplier L^-a inside blocks. Weight decay is 0 on vectors; on the other groups it is
chosen so every decayed group loses the same fraction of its weights per step as at the
base shape, which depends on how the optimizer applies it (``WeightDecayMode``):

- "decoupled": per-step decay wd_group x schedule factor (fljob's ``decouple=True``,
  Composer's DecoupledAdamW): wd_group = wd.
- "lr_coupled": per-step decay lr_group x wd_group (torch AdamW): wd_group = wd x
  lr/lr_group (= wd x m for hidden matrices at a = 1, the CompleteP rule).
- "l2": wd x p added to the gradient before Adam-style normalisation (fljob's
  ``decouple=False``): the decay then acts in gradient units, wd_group = wd x
  (lr/lr_group) x (eps_group/eps).

With ``mup_enabled`` False every factor is 1 (weight decay still 0 on vectors): the
standard-parametrisation baseline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import nn

from fljob.trainer.model.args import ModelArgs

GROUP_NAMES: tuple[str, ...] = ("embedding", "output", "hidden", "hidden_ffn_out",
                                 "hidden_vector", "vector")
_DECAYED = frozenset({"embedding", "output", "hidden", "hidden_ffn_out"})

WeightDecayMode = Literal["decoupled", "lr_coupled", "l2"]
WEIGHT_DECAY_MODES: tuple[str, ...] = get_args(WeightDecayMode)

# Segments that wrappers insert into parameter names; stripped before matching.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module",
                               "module"})
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("embedding", re.compile(r"tok_embeddings\.weight")),
    ("output", re.compile(r"output\.weight")),
    ("hidden", re.compile(
        r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[13])\.weight")),
    ("hidden_ffn_out", re.compile(r"layers\.\d+\.feed_forward\.w2\.weight")),
    ("hidden_vector", re.compile(
        r"layers\.\d+\.(attention_norm|ffn_norm|post_attn_norm|post_ffn_norm)\.weight")),
    ("vector", re.compile(r"(embedding_norm|norm)\.weight")),
)


@dataclass(frozen=True)
class GroupScale:
    """Multipliers applied to the base lr, weight decay and eps of one group."""

    lr: float
    weight_decay: float
    eps: float


def group_scales(args: ModelArgs, *, weight_decay_mode: WeightDecayMode) -> dict[str, GroupScale]:
    """The per-group multipliers of the module docstring, for these args."""
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, "
                         f"got {weight_decay_mode!r}")
    # Hidden matrices: lr / (own fan-in ratio). Under muP every gradient entry scales as
    # 1/m (the 1/m logit multiplier lies on the backward path of every parameter); inside
    # blocks the residual multiplier L^-a scales them once more. All 1 in SP.
    m, m_ffn = (args.width_mult, args.ffn_width_mult) if args.mup_enabled else (1.0, 1.0)
    depth_lr = args.hidden_lr_depth_factor
    outer, block = 1.0 / m, args.residual_mult / m
    lr = {"embedding": 1.0, "output": 1.0, "hidden": depth_lr / m,
          "hidden_ffn_out": depth_lr / m_ffn, "hidden_vector": depth_lr, "vector": 1.0}
    grad = {"embedding": outer, "output": outer, "hidden": block, "hidden_ffn_out": block,
            "hidden_vector": block, "vector": outer}

    def weight_decay(group: str) -> float:
        if group not in _DECAYED:
            return 0.0
        if weight_decay_mode == "decoupled":
            return 1.0
        if weight_decay_mode == "lr_coupled":
            return 1.0 / lr[group]
        return grad[group] / lr[group]

    return {g: GroupScale(lr[g], weight_decay(g), grad[g]) for g in GROUP_NAMES}


def canonical_name(name: str) -> str:
    """The parameter name without wrapper segments (compile, AC, FSDP1/DDP)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def classify(name: str, args: ModelArgs) -> str:
    """The group of one parameter name; ValueError for a name no rule covers."""
    canonical = canonical_name(name)
    for group, pattern in _PATTERNS:
        if pattern.fullmatch(canonical):
            if group == "output" and args.tie_word_embeddings:
                return "embedding"
            return group
    raise ValueError(f"parameter {name!r} belongs to no muP group")


def mup_param_groups(
    model: nn.Module,
    args: ModelArgs,
    *,
    lr: float,
    weight_decay: float,
    eps: float,
    weight_decay_mode: WeightDecayMode,
) -> list[dict[str, Any]]:
    """Optimizer param groups with muP-scaled 'lr', 'weight_decay' and 'eps'.

    Each dict also carries a 'name' from ``GROUP_NAMES`` (a bounded metrics label).
    Works on a wrapped model (FSDP2, AC, per-block compile); a tied weight appears once;
    frozen parameters are left out; empty groups are dropped. Raises ValueError if a
    trainable parameter matches no group, so a new module cannot silently go unscaled.

    ``weight_decay_mode`` says how the optimizer applies weight decay (module docstring);
    the per-group values keep the base shape's decay rate under that semantics.
    """
    members: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    unmatched = []
    for name, param in model.named_parameters():  # shared parameters once
        if not param.requires_grad:
            continue
        try:
            members[classify(name, args)].append(param)
        except ValueError:
            unmatched.append(name)
    if unmatched:
        raise ValueError(f"parameters outside every muP group: {unmatched}")
    scales = group_scales(args, weight_decay_mode=weight_decay_mode)
    return [
        {
            "name": group,
            "params": params,
            "lr": lr * scales[group].lr,
            "weight_decay": weight_decay * scales[group].weight_decay,
            "eps": eps * scales[group].eps,
        }
        for group, params in members.items()
        if params
    ]
