"""QHADOPT: ADOPT with a quasi-hyperbolic step; ADOPT itself is its nu = 1 case."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fljob.trainer.optim import fused
from fljob.trainer.optim.base import Bucket, Group, MomentOptimizer
from fljob.trainer.optim.weight_decay import (
    coupled_coefficient,
    coupled_grad,
    coupled_grads_foreach,
    decay_,
    decay_foreach_,
    decoupled_multiplier,
)


class QHADOPT(MomentOptimizer):
    r"""ADOPT (Taniguchi et al., 2024) whose step mixes the momentum with the fresh gradient.

    The first gradient :math:`g_0` only seeds the second moment, :math:`v_0 = g_0^2`; that
    step changes no parameter (and applies no decoupled decay). For :math:`t \ge 1`:

    .. math::
        \hat g_t &= \mathrm{clip}\!\left(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},\; c_t\right),
            \qquad c_t = t^{\,\mathrm{clip\_exponent}} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, \hat g_t, \qquad m_0 = 0 \\
        p_t &= p_{t-1} - \mathrm{lr}\,\big((1-\nu_1)\, \hat g_t + \nu_1 m_t\big) \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2

    :math:`\nu_1 = 1` is ADOPT (:class:`ADOPT`); the quasi-hyperbolic mix follows Ma & Yarats
    (2019) with ADOPT's normalised gradient in place of the raw one. ``nus`` has QHAdamW's
    shape, but :math:`\nu_2` must be 1: mixing :math:`g_t^2` into the normaliser, as QHAdam
    does, would bring back the gradient/normaliser correlation that ADOPT removes.

    ``clip`` is elementwise to :math:`[-c_t, c_t]`; the ADOPT authors' implementation uses
    :math:`c_t = t^{1/4}` (``clip_exponent=0.25``, the default) and ``clip_exponent=None``
    disables clipping. The exponent is a float rather than a callable so that the state
    dict stays plain data. There is no bias correction. Weight decay is as in
    :mod:`.weight_decay`; ``decouple=False`` (coupled L2) is the ADOPT paper's default. The
    ``step`` counter includes the seeding gradient, so :math:`t` = ``step - 1``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.999, 0.9999),
        nus: tuple[float, float] = (0.9, 1.0),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        decouple: bool = False,
        clip_exponent: float | None = 0.25,
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "nus": tuple(nus),
            "eps": eps,
            "weight_decay": weight_decay,
            "decouple": decouple,
            "clip_exponent": clip_exponent,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def check_group(self, group: Group) -> None:
        super().check_group(group)
        nus, exponent = group["nus"], group["clip_exponent"]
        if len(nus) != 2 or not 0.0 <= nus[0] <= 1.0 or nus[1] != 1.0:
            raise ValueError(f"nus must be (nu1, 1.0) with nu1 in [0, 1], got {nus}")
        if exponent is not None and not exponent >= 0.0:
            raise ValueError(f"clip_exponent must be >= 0 or None, got {exponent}")

    def step_group(self, group: Group, new: Bucket, old: Bucket) -> None:
        self.run(group, new, _seed_single, _seed_foreach)
        self.run(group, old, _update_single, _update_foreach, _update_fused)


def clip_value(group: Group, step: float) -> float | None:
    """:math:`c_t` for the update made with step counter ``step`` (t = step - 1)."""
    exponent = group["clip_exponent"]
    return None if exponent is None else (step - 1.0) ** exponent


def _seed_single(group: Group, p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: float) -> None:
    g = coupled_grad(group, p, g)
    v.addcmul_(g, g)


def _seed_foreach(group: Group, b: Bucket, step: float) -> None:
    grads = coupled_grads_foreach(group, b.params, b.grads)
    torch._foreach_addcmul_(b.exp_avg_sqs, grads, grads)


def _update_single(group: Group, p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: float) -> None:
    (beta1, beta2), nu = group["betas"], group["nus"][0]
    clip = clip_value(group, step)
    decay_(group, p)
    g = coupled_grad(group, p, g)
    normed = g / v.sqrt().clamp_min_(group["eps"])
    if clip is not None:
        normed.clamp_min_(-clip).clamp_max_(clip)
    m.lerp_(normed, 1.0 - beta1)
    if nu == 1.0:
        p.add_(m, alpha=-group["lr"])
    else:
        p.add_(normed.lerp_(m, nu), alpha=-group["lr"])
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def _update_foreach(group: Group, b: Bucket, step: float) -> None:
    (beta1, beta2), nu = group["betas"], group["nus"][0]
    clip = clip_value(group, step)
    decay_foreach_(group, b.params)
    grads = coupled_grads_foreach(group, b.params, b.grads)
    denom = torch._foreach_sqrt(b.exp_avg_sqs)
    torch._foreach_clamp_min_(denom, group["eps"])
    normed = torch._foreach_div(grads, denom)
    if clip is not None:
        torch._foreach_clamp_min_(normed, -clip)
        torch._foreach_clamp_max_(normed, clip)
    torch._foreach_lerp_(b.exp_avgs, normed, 1.0 - beta1)
    if nu == 1.0:
        torch._foreach_add_(b.params, b.exp_avgs, alpha=-group["lr"])
    else:
        torch._foreach_lerp_(normed, b.exp_avgs, nu)
        torch._foreach_add_(b.params, normed, alpha=-group["lr"])
    torch._foreach_mul_(b.exp_avg_sqs, beta2)
    torch._foreach_addcmul_(b.exp_avg_sqs, grads, grads, value=1.0 - beta2)


def _update_fused(group: Group, b: Bucket, step: float) -> None:
    fused.adopt_step(
        (b.params, b.grads, b.exp_avgs, b.exp_avg_sqs), lr=group["lr"], betas=group["betas"],
        nu=group["nus"][0], eps=group["eps"], decay=decoupled_multiplier(group),
        coupled_wd=coupled_coefficient(group), clip=clip_value(group, step))
