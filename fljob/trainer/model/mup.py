"""muP / CompleteP optimizer parameter groups: per-group lr, weight decay and Adam eps.

The rules, with m = dim/base_dim, L = n_layers/base_depth, alpha = depth_alpha (MUP.md
has the derivation):

| group         | members                                  | lr          | wd      | eps        |
|---------------|------------------------------------------|-------------|---------|------------|
| embedding     | tok_embeddings.weight (+ output if tied) | lr          | wd      | eps/m      |
| output        | output.weight (untied only)              | lr          | wd      | eps/m      |
| hidden        | the 7 block matrices                     | lr*L^(a-1)/m| see (*) | eps/(m L^a)|
| hidden_vector | block norm gains                         | lr*L^(a-1)  | 0       | eps/(m L^a)|
| vector        | embedding_norm, final norm gains         | lr          | 0       | eps/m      |

(*) weight decay keeps every decayed group's decay timescale equal to the embedding's:
for an optimizer whose per-step decay is lr_group*wd_group (torch AdamW), wd_group =
wd * lr/lr_group (= wd*m at alpha 1); for a decoupled one whose per-step decay is
wd_group times the schedule factor (DecoupledAdamW), wd_group = wd.

With ``mup_enabled`` False every factor is 1 (weight decay still 0 on vectors): the
standard-parametrisation baseline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from fljob.trainer.model.args import ModelArgs

GROUP_NAMES: tuple[str, ...] = ("embedding", "output", "hidden", "hidden_vector", "vector")

# Segments that wrappers insert into parameter names; stripped before matching.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module",
                               "module"})
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("embedding", re.compile(r"tok_embeddings\.weight")),
    ("output", re.compile(r"output\.weight")),
    ("hidden", re.compile(
        r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")),
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


def group_scales(args: ModelArgs, *, decoupled_weight_decay: bool) -> dict[str, GroupScale]:
    """The per-group multipliers of the module docstring's table, for these args."""
    if not args.mup_enabled:
        decayed, vector = GroupScale(1.0, 1.0, 1.0), GroupScale(1.0, 0.0, 1.0)
        return {"embedding": decayed, "output": decayed, "hidden": decayed,
                "hidden_vector": vector, "vector": vector}
    m = args.width_mult
    depth_lr = args.hidden_lr_depth_factor
    # Every gradient entry scales as 1/m under this parametrisation (the 1/m logit
    # multiplier sits on the backward path of all parameters); block parameters also
    # carry the residual multiplier L^-alpha. Adam's eps must shrink with them.
    eps_outer, eps_block = 1.0 / m, args.residual_mult / m
    hidden_lr = depth_lr / m
    hidden_wd = 1.0 if decoupled_weight_decay else 1.0 / hidden_lr
    return {
        "embedding": GroupScale(1.0, 1.0, eps_outer),
        "output": GroupScale(1.0, 1.0, eps_outer),
        "hidden": GroupScale(hidden_lr, hidden_wd, eps_block),
        "hidden_vector": GroupScale(depth_lr, 0.0, eps_block),
        "vector": GroupScale(1.0, 0.0, eps_outer),
    }


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
    decoupled_weight_decay: bool,
) -> list[dict[str, Any]]:
    """Optimizer param groups with muP-scaled 'lr', 'weight_decay' and 'eps'.

    Each dict also carries a 'name' from ``GROUP_NAMES`` (a bounded metrics label).
    Works on a wrapped model (FSDP2, AC, per-block compile); a tied weight appears once;
    frozen parameters are left out; empty groups are dropped. Raises ValueError if a
    trainable parameter matches no group, so a new module cannot silently go unscaled.

    ``decoupled_weight_decay``: True when the optimizer's per-step decay does not
    multiply by the learning rate (module docstring).
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
    scales = group_scales(args, decoupled_weight_decay=decoupled_weight_decay)
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
