"""Optimizer registry keyed by the job spec's names, and the one-line factory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from fljob.trainer.optim.adamw import AdamW
from fljob.trainer.optim.adopt import ADOPT
from fljob.trainer.optim.decoupled_adamw import DecoupledAdamW
from fljob.trainer.optim.qhadamw import QHAdamW
from fljob.trainer.optim.qhadopt import QHADOPT

if TYPE_CHECKING:
    from fljob.trainer.model.mup import WeightDecayMode

OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adopt": ADOPT,
    "qhadamw": QHAdamW,
    "qhadopt": QHADOPT,
    "decoupled_adamw": DecoupledAdamW,
    "adamw": AdamW,
}

QUASI_HYPERBOLIC = frozenset({"qhadamw", "qhadopt"})
"""Optimizers that take the spec's ``nus``."""

WEIGHT_DECAY_MODES: dict[str, WeightDecayMode] = {
    "adamw": "lr_coupled",  # torch AdamW: p *= 1 - lr * wd
    "decoupled_adamw": "decoupled",
    "qhadamw": "decoupled",  # its default decouple=True
    "adopt": "l2",  # its default decouple=False
    "qhadopt": "l2",
}
"""How each optimizer applies weight decay with the defaults fljob builds it with (see
``fljob.trainer.optim.weight_decay``); muP scales each group's decay accordingly."""


def build_optimizer(name: str, param_groups: ParamsT, **hyper: Any) -> Optimizer:
    """Construct ``OPTIMIZERS[name](param_groups, **hyper)``.

    ``hyper`` are the constructor's keyword arguments and act as defaults for groups that
    do not set their own (muP groups set lr, weight_decay and eps per group). An argument
    the class does not take (e.g. ``amsgrad`` for anything but ``adamw``, or ``nus``
    for ``adopt``) raises ``TypeError`` rather than being dropped.
    """
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; expected one of {', '.join(sorted(OPTIMIZERS))}"
        ) from None
    return cls(param_groups, **hyper)
