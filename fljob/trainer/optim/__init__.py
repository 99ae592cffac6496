"""fljob's optimizers: ADOPT, QHADOPT, QHAdamW, DecoupledAdamW and torch's AdamW.

Every registered optimizer keeps, per parameter, ``state[p]["exp_avg"]`` (first moment),
``state[p]["exp_avg_sq"]`` (second moment) and ``state[p]["step"]`` (a 0-dim tensor), so
metrics read moments uniformly (details in :mod:`.base`). Weight-decay semantics are in
:mod:`.weight_decay`.
"""

from fljob.trainer.optim.adamw import AdamW
from fljob.trainer.optim.adopt import ADOPT
from fljob.trainer.optim.builder import OPTIMIZERS, build_optimizer
from fljob.trainer.optim.decoupled_adamw import DecoupledAdamW
from fljob.trainer.optim.qhadamw import QHAdamW
from fljob.trainer.optim.qhadopt import QHADOPT

__all__ = [
    "ADOPT",
    "OPTIMIZERS",
    "QHADOPT",
    "AdamW",
    "DecoupledAdamW",
    "QHAdamW",
    "build_optimizer",
]
