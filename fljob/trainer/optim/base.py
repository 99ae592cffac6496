"""The skeleton shared by ADOPT, QHADOPT, QHAdamW and DecoupledAdamW.

It owns what the four have in common: hyperparameter checks, the ``initial_lr`` that
decoupled weight decay needs, lazy state creation, the step counters, and the choice
between the single-tensor, foreach and fused paths. Subclasses supply only their update
rule, once per tensor (``single``) and once per device/dtype bucket (``foreach``, and
``fused``, which calls the kernel of :mod:`.fused`).

State protocol (read by ``fljob.trainer.metrics``; ``torch.optim.AdamW`` keeps the same
keys): for every parameter that has received a gradient, ``optimizer.state[p]`` holds

* ``exp_avg``    -- the first moment buffer, shaped like ``p``;
* ``exp_avg_sq`` -- the second moment buffer, shaped like ``p``;
* ``step``       -- a 0-dim float32 tensor: how many gradients ``p`` has consumed. Here it
  lives on the CPU, so reading it never waits for the GPU.

Step-dependent scalars (bias corrections, ADOPT's clip value) are computed on the host from
these CPU counters; the step never calls ``.item()`` on a device tensor.

Paths, per group: single-tensor (``foreach=False``), foreach (``foreach=True``; the default
off the CPU), and fused (``fused=True``, CUDA only): one Triton launch per bucket, see
:mod:`.fused`. The fused path is what makes a step cost about what ``torch.optim.AdamW(
fused=True)`` costs (``bench/optimizer_step.py``); buckets the kernel cannot take (float64,
mixed dtypes, non-contiguous) fall back to foreach.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from fljob.trainer.optim.fused import check_fused_device, supports_fused
from fljob.trainer.optim.weight_decay import check_weight_decay

Group = dict[str, Any]


@dataclass
class Bucket:
    """Parallel lists of parameters, gradients and their state."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)

    def lists(self) -> list[list[Tensor]]:
        return [self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps]

    def __add__(self, other: Bucket) -> Bucket:
        return Bucket(*(a + b for a, b in zip(self.lists(), other.lists(), strict=True)))


SingleUpdate = Callable[[Group, Tensor, Tensor, Tensor, Tensor, float], None]
"""``(group, param, grad, exp_avg, exp_avg_sq, step)``, ``step`` already incremented."""
ForeachUpdate = Callable[[Group, Bucket, float], None]
"""``(group, bucket, step)``: every tensor of ``bucket`` shares device, dtype and ``step``.
The fused updates have the same signature."""


class MomentOptimizer(Optimizer):
    """Base class; see the module docstring. Not registered as an optimizer itself."""

    def add_param_group(self, param_group: Group) -> None:
        """Add a group; record its ``initial_lr`` and resolve ``foreach=None``.

        ``initial_lr`` is set only if absent, and torch's LR schedulers keep an existing
        one, so ``lr / initial_lr`` is the schedule multiplier.
        ``foreach=None`` means foreach when every parameter of the group is off the CPU
        (torch's own default), unless the group is fused.
        """
        self.check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])
        if group.setdefault("fused", False):
            if group["foreach"]:
                raise ValueError("foreach and fused cannot both be True")
            check_fused_device(group["params"])
            group["foreach"] = False
        elif group["foreach"] is None:
            group["foreach"] = all(p.device.type != "cpu" for p in group["params"])

    def check_group(self, group: Group) -> None:
        """Validate one group's hyperparameters; subclasses extend it."""
        lr, eps, betas = group["lr"], group["eps"], group["betas"]
        if isinstance(lr, Tensor) or not lr >= 0.0:
            raise ValueError(f"lr must be a float >= 0, got {lr!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        check_weight_decay(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            new, old = self._gather(group)
            self.step_group(group, new, old)
        return loss

    def step_group(self, group: Group, new: Bucket, old: Bucket) -> None:
        """Update one group; ``new`` holds parameters whose state was created in this step."""
        raise NotImplementedError

    def _gather(self, group: Group) -> tuple[Bucket, Bucket]:
        new, old = Bucket(), Bucket()
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            bucket = old
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bucket = new
            bucket.params.append(p)
            bucket.grads.append(p.grad)
            bucket.exp_avgs.append(state["exp_avg"])
            bucket.exp_avg_sqs.append(state["exp_avg_sq"])
            bucket.steps.append(state["step"])
        return new, old

    @staticmethod
    def run(group: Group, bucket: Bucket, single: SingleUpdate, foreach: ForeachUpdate,
            fused: ForeachUpdate | None = None) -> None:
        """Increment the step counters of ``bucket`` and apply the update on the group's path.

        ``fused`` is None where a rule has no kernel (ADOPT's one-off seeding step): such a
        fused group takes the foreach path.
        """
        if not bucket.params:
            return
        torch._foreach_add_(bucket.steps, 1.0)
        if not (group["foreach"] or group.get("fused")):
            for p, g, m, v, s in zip(*bucket.lists(), strict=True):
                single(group, p, g, m, v, s.item())
            return
        grouped = Optimizer._group_tensors_by_device_and_dtype(bucket.lists())
        for lists, _ in grouped.values():
            for step, sub in _split_by_step(Bucket(*lists)):
                if group.get("fused") and fused is not None \
                        and supports_fused(sub.params, sub.grads):
                    fused(group, sub, step)
                else:
                    foreach(group, sub, step)


def _split_by_step(bucket: Bucket) -> Iterator[tuple[float, Bucket]]:
    """Yield sub-buckets whose parameters share one step count.

    Normally every parameter of a group has the same count and the bucket is yielded whole;
    counts differ only for parameters that missed gradients, and only then is there a
    Python loop over tensors.
    """
    steps = torch.stack(bucket.steps).tolist()
    if min(steps) == max(steps):
        yield steps[0], bucket
        return
    by_step: dict[float, list[int]] = {}
    for i, s in enumerate(steps):
        by_step.setdefault(s, []).append(i)
    for s, idx in by_step.items():
        yield s, Bucket(*([lst[i] for i in idx] for lst in bucket.lists()))
