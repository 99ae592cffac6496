"""QHAdamW: quasi-hyperbolic Adam (Ma & Yarats, 2019) with fljob's weight decay."""

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


class QHAdamW(MomentOptimizer):
    r"""QHAdam ("Quasi-hyperbolic momentum and Adam for deep learning", ICLR 2019).

    At step :math:`t` (1-based), with weight decay as in :mod:`.weight_decay`:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t, \qquad
        v_t  = \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
        \hat m_t &= m_t / (1-\beta_1^t), \qquad \hat v_t = v_t / (1-\beta_2^t) \\
        p_t &= p_{t-1} - \mathrm{lr}\,
              \frac{(1-\nu_1)\, g_t + \nu_1 \hat m_t}
                   {\sqrt{(1-\nu_2)\, g_t^2 + \nu_2 \hat v_t} + \epsilon}

    :math:`\nu = (1, 1)` is Adam exactly, which is how :class:`DecoupledAdamW` reuses this
    class; terms whose weight is zero are skipped, so that costs nothing. Defaults are the
    paper's recommended QHAdam setting (:math:`\nu = (0.7, 1)`, :math:`\beta = (0.995, 0.999)`);
    the "W" is the default ``decouple=True``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.995, 0.999),
        nus: tuple[float, float] = (0.7, 1.0),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decouple: bool = True,
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
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def check_group(self, group: Group) -> None:
        super().check_group(group)
        nus = group["nus"]
        if len(nus) != 2 or not all(0.0 <= nu <= 1.0 for nu in nus):
            raise ValueError(f"nus must be two numbers in [0, 1], got {nus}")

    def step_group(self, group: Group, new: Bucket, old: Bucket) -> None:
        self.run(group, new + old if new.params else old, _single, _foreach, _fused)


def _single(group: Group, p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: float) -> None:
    (beta1, beta2), (nu1, nu2) = group["betas"], group["nus"]
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    decay_(group, p)
    g = coupled_grad(group, p, g)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = v.mul(nu2 / bc2)
    if nu2 != 1.0:
        denom.addcmul_(g, g, value=1.0 - nu2)
    denom.sqrt_().add_(group["eps"])
    if nu1 == 1.0:
        p.addcdiv_(m, denom, value=-group["lr"] / bc1)
    else:
        numer = m.mul(nu1 / bc1).add_(g, alpha=1.0 - nu1)
        p.addcdiv_(numer, denom, value=-group["lr"])


def _foreach(group: Group, b: Bucket, step: float) -> None:
    (beta1, beta2), (nu1, nu2) = group["betas"], group["nus"]
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    decay_foreach_(group, b.params)
    grads = coupled_grads_foreach(group, b.params, b.grads)
    torch._foreach_lerp_(b.exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(b.exp_avg_sqs, beta2)
    torch._foreach_addcmul_(b.exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_mul(b.exp_avg_sqs, nu2 / bc2)
    if nu2 != 1.0:
        torch._foreach_addcmul_(denom, grads, grads, value=1.0 - nu2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, group["eps"])
    if nu1 == 1.0:
        torch._foreach_addcdiv_(b.params, b.exp_avgs, denom, value=-group["lr"] / bc1)
    else:
        numer = torch._foreach_mul(b.exp_avgs, nu1 / bc1)
        torch._foreach_add_(numer, grads, alpha=1.0 - nu1)
        torch._foreach_addcdiv_(b.params, numer, denom, value=-group["lr"])


def _fused(group: Group, b: Bucket, step: float) -> None:
    fused.qhadam_step(
        (b.params, b.grads, b.exp_avgs, b.exp_avg_sqs), lr=group["lr"], betas=group["betas"],
        nus=group["nus"], eps=group["eps"], decay=decoupled_multiplier(group),
        coupled_wd=coupled_coefficient(group), step=step)
