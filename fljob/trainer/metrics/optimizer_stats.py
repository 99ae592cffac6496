"""Optimizer statistics per muP parameter group, reduced across ranks every N steps.

Use, around every optimizer step::

    stats = OptimizerStats(optimizer, interval=spec.metrics.optimizer_interval)
    ...                                  # backward, gradient clipping
    stats.before_step(step)
    optimizer.step()
    values = stats.after_step(step)      # None unless step % interval == 0
    lr_scheduler.step()

Every rank must make the same calls (a metric step runs two collectives); every rank gets
the same, already global, values.

Keys
----
``optim/<group>/<stat>``. ``<group>`` is the param group's ``name`` (``group<i>`` when it has
none) or ``all`` for every parameter of the optimizer together; group names are few (the muP
groups), so they suit a bounded ``group`` label. ``<stat>``, with every sum taken over the
elements of the group's parameters on all ranks, each element counted once:

* ``param_norm``: ``sqrt(sum p**2)`` after the step, over all the group's parameters.
* ``grad_norm``: ``sqrt(sum g**2)`` of the gradients the step consumes, read in
  :meth:`OptimizerStats.before_step` (so after any clipping the trainer did before it).
* ``grad_max_abs``: ``max |g|``.
* ``update_norm``: ``sqrt(sum (p_after - p_before)**2)``, the change the step really made,
  weight decay included, whatever the update rule.
* ``update_ratio``: ``update_norm / param_norm`` (post-step norm); 0 when both are 0.
* ``exp_avg_norm``: ``sqrt(sum m**2)`` of the first moment ``state["exp_avg"]``.
* ``exp_avg_sq_sqrt_norm``: ``sqrt(sum v)`` of the second moment ``v = state["exp_avg_sq"]``,
  which equals ``||sqrt(v)||_2``: the norm of the optimizer's RMS-gradient estimate, in
  gradient units, so comparable with ``grad_norm`` (``||v||_2`` would be in squared units).
* ``lr``: ``group["lr"]`` when :meth:`OptimizerStats.after_step` runs (per group only, not
  ``all``); call it before the scheduler steps to get the rate the step used. (A tensor lr
  on the device would cost a second sync; fljob's optimizers take floats.)

The two moment stats appear only when some parameter's state holds the key (SGD has
neither); parameters without the key or without a gradient contribute nothing. ``all`` sums
the groups' sums (and takes the maximum of their maxima) before the square root.

Reduction
---------
Each rank computes, per group, partial sums of squares (sums of ``v`` for the second moment)
and maxima over its local pieces, with one ``torch._foreach_norm`` per statistic and
device/dtype bucket. Sums are all-reduced with SUM and maxima with MAX (one packed vector
each) in float64, and only then is the square root taken. So that nothing is counted twice:

* a DTensor (FSDP2, TP) contributes its local shard, but only from ranks whose coordinate is
  0 on every mesh dimension where it is not sharded (e.g. the replicate dimension of HSDP);
* a plain tensor is taken to be a replica (DDP) and counted on rank 0 of the group only;
* empty shards (FSDP2 gives them to ranks past a short dim 0) are skipped. FSDP2's padding
  is not in the local tensor, so it is never counted.

``process_group`` must span every rank that holds a distinct piece of the parameters (the
default, the world, always does), and every rank's optimizer must list the same groups in
the same order.

Cost
----
Off metric steps both methods return at once: no kernel, no collective, no host sync. On a
metric step: one flat copy of the local parameter shards that have gradients (taken before
the step and turned into the update in place, so the update costs no second buffer), about
six foreach-norm launches per device/dtype bucket plus a few small vector kernels, two
all-reduces (``5 * n_groups`` float64 sums, ``n_groups`` maxima), and one device-to-host copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

GLOBAL_GROUP = "all"
"""The ``<group>`` of statistics over every parameter of the optimizer."""

_SUMS = ("param_norm", "grad_norm", "update_norm", "exp_avg_norm", "exp_avg_sq_sqrt_norm")
"""Statistics reduced as sums, in the order of the packed vector; all reported as sqrt(sum)."""
_MAXES = ("grad_max_abs",)
"""Statistics reduced as maxima."""
_MOMENTS = {"exp_avg_norm": ("exp_avg", 2.0), "exp_avg_sq_sqrt_norm": ("exp_avg_sq", 1.0)}
"""Moment statistic -> (state key, norm order): the order-1 norm of v >= 0 is its sum."""
_INDEX_CACHE_SIZE = 64
"""Bound on cached slot-index tensors; layouts change only while state is being created."""


def _local(t: Tensor) -> Tensor:
    """This rank's piece of ``t``; ``_local_tensor`` skips ``to_local``'s autograd overhead."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _buckets(tensors: list[Tensor]) -> list[list[int]]:
    """Positions of ``tensors`` grouped by (device, dtype), as foreach kernels need."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


@dataclass
class _Pending:
    """What :meth:`OptimizerStats.before_step` hands to :meth:`OptimizerStats.after_step`."""

    step: int
    buffer: Tensor
    """Packed float64 partials: ``len(_SUMS)`` rows of sums, then ``len(_MAXES)`` of maxima."""
    snapshots: list[tuple[Tensor, list[Tensor], list[int]]]
    """Per bucket: flat pre-step copy of the local shards, their parameters, their slots."""


class OptimizerStats:
    """Per-group and global optimizer statistics every ``interval`` steps; see the module doc."""

    def __init__(
        self,
        optimizer: Optimizer,
        interval: int,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        """``device`` holds the packed vectors and must suit the process group's backend
        (CUDA for NCCL); it defaults to the device of the first parameter."""
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.optimizer = optimizer
        self.interval = interval
        self.group_names = self._group_names()
        distributed = dist.is_available() and dist.is_initialized()
        self._group = process_group if distributed else None
        self._rank = dist.get_rank(process_group) if distributed else 0
        self._world = dist.get_world_size(process_group) if distributed else 1
        first = optimizer.param_groups[0]["params"][0]
        self._device = device if device is not None else _local(first).device
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self._pending: _Pending | None = None

    def is_metric_step(self, step: int) -> bool:
        """Whether ``step`` computes statistics."""
        return step % self.interval == 0

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Measure the gradients and copy the parameters that the step will change.

        Call right before ``optimizer.step()``, after any gradient clipping. Off metric steps
        it only drops a copy left by a metric step whose optimizer step was skipped.
        """
        self._pending = None
        if not self.is_metric_step(step):
            return
        self.group_names = self._group_names()
        n_slots = len(self.group_names)
        buffer = torch.zeros((len(_SUMS) + len(_MAXES)) * n_slots, dtype=torch.float64,
                             device=self._device)
        sums, maxes = self._rows(buffer)
        params: list[Tensor] = []
        locals_: list[Tensor] = []
        grads: list[Tensor] = []
        slots: list[int] = []
        for slot, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                if p.grad is None or not self._counts_here(p):
                    continue
                grad = _local(p.grad)
                if grad.numel() == 0:
                    continue
                params.append(p)
                locals_.append(_local(p))
                grads.append(grad)
                slots.append(slot)
        self._accumulate(sums[_SUMS.index("grad_norm")], grads, slots, 2.0)
        self._accumulate(maxes[_MAXES.index("grad_max_abs")], grads, slots, math.inf)
        snapshots = []
        for idx in _buckets(locals_):
            flat = torch.cat([locals_[i].reshape(-1) for i in idx])
            snapshots.append((flat, [params[i] for i in idx], [slots[i] for i in idx]))
        self._pending = _Pending(step, buffer, snapshots)

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, float] | None:
        """Finish the statistics of a metric step and reduce them; None on other steps.

        Call right after ``optimizer.step()`` with the step given to :meth:`before_step`.
        """
        if not self.is_metric_step(step):
            return None
        pending, self._pending = self._pending, None
        if pending is None or pending.step != step:
            raise RuntimeError(f"after_step({step}) needs before_step({step}) first")
        sums, maxes = self._rows(pending.buffer)

        for flat, params, slots in pending.snapshots:
            deltas = list(flat.split([_local(p).numel() for p in params]))
            torch._foreach_sub_(deltas, [_local(p).reshape(-1) for p in params])
            self._accumulate(sums[_SUMS.index("update_norm")], deltas, slots, 2.0)
        del pending.snapshots

        locals_: list[Tensor] = []
        slots_: list[int] = []
        moments: dict[str, tuple[list[Tensor], list[int]]] = {s: ([], []) for s in _MOMENTS}
        present: set[str] = set()
        for slot, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                for stat, (key, _) in _MOMENTS.items():
                    if isinstance(state.get(key), Tensor):
                        present.add(stat)
                local = _local(p)
                if local.numel() == 0 or not self._counts_here(p):
                    continue
                locals_.append(local)
                slots_.append(slot)
                for stat, (key, _) in _MOMENTS.items():
                    moment = state.get(key)
                    if isinstance(moment, Tensor):
                        moments[stat][0].append(_local(moment))
                        moments[stat][1].append(slot)
        self._accumulate(sums[_SUMS.index("param_norm")], locals_, slots_, 2.0)
        for stat, (_, order) in _MOMENTS.items():
            self._accumulate(sums[_SUMS.index(stat)], *moments[stat], order)

        if self._world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self._group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self._group)
        values = pending.buffer.tolist()  # the one device-to-host copy
        return self._report(values, present)

    def _group_names(self) -> list[str]:
        """Each param group's ``name``, checked to be usable as a bounded label value."""
        names = []
        for i, group in enumerate(self.optimizer.param_groups):
            name = group.get("name", f"group{i}")
            if not isinstance(name, str) or not name or "/" in name or name == GLOBAL_GROUP:
                raise ValueError(
                    f"param group {i} name {name!r}: need a non-empty str without '/', "
                    f"other than {GLOBAL_GROUP!r}"
                )
            if name in names:
                raise ValueError(f"param group name {name!r} appears twice")
            names.append(name)
        return names

    def _rows(self, buffer: Tensor) -> tuple[Tensor, Tensor]:
        """Views of the packed buffer: (sums, maxima), one row per statistic."""
        n_slots = len(self.group_names)
        sums, maxes = buffer.split([len(_SUMS) * n_slots, len(_MAXES) * n_slots])
        return sums.view(len(_SUMS), n_slots), maxes.view(len(_MAXES), n_slots)

    def _counts_here(self, p: Tensor) -> bool:
        """Whether this rank's piece of ``p`` is counted (see "Reduction" in the module doc)."""
        if isinstance(p, DTensor):
            coordinate = p.device_mesh.get_coordinate()
            if coordinate is None:
                return False
            return all(pl.is_shard() or c == 0 for pl, c in zip(p.placements, coordinate,
                                                                 strict=True))
        return self._rank == 0

    def _index(self, slots: list[int]) -> Tensor:
        """``slots`` as a device tensor, cached: layouts repeat from one metric step to the next."""
        key = tuple(slots)
        index = self._index_cache.get(key)
        if index is None:
            host = torch.tensor(slots, dtype=torch.long)
            if self._device.type != "cpu":
                host = host.pin_memory()  # so that the copy below does not wait for the device
            index = host.to(self._device, non_blocking=True)
            if len(self._index_cache) >= _INDEX_CACHE_SIZE:
                self._index_cache.clear()
            self._index_cache[key] = index
        return index

    def _accumulate(self, row: Tensor, tensors: list[Tensor], slots: list[int],
                    order: float) -> None:
        """Add each tensor's contribution to ``row[slot]``: its norm squared for order 2,
        its order-1 norm for order 1, a running maximum of ``max |x|`` for order inf."""
        for idx in _buckets(tensors):
            bucket = [tensors[i] for i in idx]
            accumulate_dtype = torch.float64 if bucket[0].dtype == torch.float64 else torch.float32
            norms = torch.stack(torch._foreach_norm(bucket, order, dtype=accumulate_dtype))
            norms = norms.to(self._device, torch.float64, non_blocking=self._device.type != "cpu")
            index = self._index([slots[i] for i in idx])
            if order == math.inf:
                row.scatter_reduce_(0, index, norms, "amax")
            else:
                row.index_add_(0, index, norms.square() if order == 2.0 else norms)

    def _report(self, values: list[float], present: set[str]) -> dict[str, float]:
        """Turn the reduced packed vector into the flat ``optim/<group>/<stat>`` dict."""
        n_slots = len(self.group_names)
        rows = {stat: values[i * n_slots:(i + 1) * n_slots] for i, stat in enumerate(_SUMS)}
        offset = len(_SUMS) * n_slots
        rows |= {stat: values[offset + i * n_slots:offset + (i + 1) * n_slots]
                 for i, stat in enumerate(_MAXES)}
        columns = [({stat: rows[stat][slot] for stat in rows}, name)
                   for slot, name in enumerate(self.group_names)]
        total = {stat: (max if stat in _MAXES else math.fsum)(rows[stat]) for stat in rows}
        out: dict[str, float] = {}
        for column, name in [*columns, (total, GLOBAL_GROUP)]:
            prefix = f"optim/{name}/"
            for stat in _SUMS:
                if stat in _MOMENTS and stat not in present:
                    continue
                out[prefix + stat] = math.sqrt(column[stat])
            for stat in _MAXES:
                out[prefix + stat] = column[stat]
            update, param = out[prefix + "update_norm"], out[prefix + "param_norm"]
            out[prefix + "update_ratio"] = update / param if param > 0 else (
                0.0 if update == 0 else math.inf)
        for group, name in zip(self.optimizer.param_groups, self.group_names, strict=True):
            out[f"optim/{name}/lr"] = float(group["lr"])
        return out
