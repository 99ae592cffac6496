r"""Weight-decay semantics of fljob's own optimizers, in one place.

A parameter group chooses one of two modes with its ``decouple`` flag:

* **decoupled** (``decouple=True``, Composer/"Mosaic" semantics): before the update, every
  step multiplies the parameter by

  .. math:: 1 - f \cdot \mathrm{wd}, \qquad f = \mathrm{lr} / \mathrm{initial\_lr}

  where ``initial_lr`` is the group's lr at construction. ``f`` is the LR schedule's
  multiplier, so the decay follows warm-up and decay of the schedule but is *not* scaled by
  the group's base lr: ``wd`` is the fraction removed per step at peak LR (think 1e-5 to
  1e-4, not torch AdamW's 0.01 to 0.1). muP groups that scale lr by width therefore decay
  at the same per-step rate; scaling ``wd`` by the width multiplier (the CompleteP rule for
  lr-coupled AdamW) would make hidden matrices decay faster instead.
* **coupled** (``decouple=False``, L2 regularisation as in Adam/ADOPT papers): the gradient
  seen by the moment updates becomes ``g + wd * p``. The sign is ``+``, so a zero gradient
  still pulls the parameter toward zero.

Neither mode is torch AdamW's ``p *= 1 - lr * wd``; that one lives in ``torch.optim.AdamW``
(registered as ``adamw``).

The functions below are the only code that applies weight decay; the optimizers call them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_weight_decay(group: dict[str, Any]) -> None:
    """Reject settings whose decay would be undefined (called when a group is added)."""
    wd = group["weight_decay"]
    if not wd >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {wd}")
    if not isinstance(group["decouple"], bool):
        raise TypeError(f"decouple must be a bool, got {group['decouple']!r}")
    initial_lr = group.get("initial_lr", group["lr"])
    if group["decouple"] and wd != 0.0 and not initial_lr > 0.0:
        raise ValueError(
            "decoupled weight decay scales with lr / initial_lr, so it needs initial_lr > 0 "
            f"(got {initial_lr}); construct the optimizer with the peak lr"
        )


def decoupled_multiplier(group: dict[str, Any]) -> float:
    """``1 - (lr / initial_lr) * wd`` for a decoupled group, 1.0 otherwise."""
    wd = group["weight_decay"]
    if not group["decouple"] or wd == 0.0:
        return 1.0
    return 1.0 - group["lr"] / group["initial_lr"] * wd


def coupled_coefficient(group: dict[str, Any]) -> float:
    """The ``wd`` added as ``wd * p`` to the gradient of a coupled group, 0.0 otherwise."""
    return 0.0 if group["decouple"] else group["weight_decay"]


def decay_(group: dict[str, Any], param: Tensor) -> None:
    """Apply decoupled decay to one parameter in place."""
    multiplier = decoupled_multiplier(group)
    if multiplier != 1.0:
        param.mul_(multiplier)


def decay_foreach_(group: dict[str, Any], params: list[Tensor]) -> None:
    """Apply decoupled decay to a device/dtype bucket in place."""
    multiplier = decoupled_multiplier(group)
    if multiplier != 1.0:
        torch._foreach_mul_(params, multiplier)


def coupled_grad(group: dict[str, Any], param: Tensor, grad: Tensor) -> Tensor:
    """The gradient with the coupled term added; ``grad`` itself is never modified."""
    wd = coupled_coefficient(group)
    return grad.add(param, alpha=wd) if wd != 0.0 else grad


def coupled_grads_foreach(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
) -> list[Tensor]:
    """Bucket version of :func:`coupled_grad`."""
    wd = coupled_coefficient(group)
    return torch._foreach_add(grads, params, alpha=wd) if wd != 0.0 else grads
