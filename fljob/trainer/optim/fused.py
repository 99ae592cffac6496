"""Fused update paths: one Triton launch per bucket reads p, g, m, v once and writes p, m, v once.

Why: an optimizer step on a GPU is bound by memory traffic, not arithmetic. The foreach
paths of :mod:`.qhadamw` and :mod:`.qhadopt` run about ten elementwise passes over the
parameter lists (every foreach op reads and writes whole tensors, and some allocate
temporaries), so they move two to three times the bytes of ``torch.optim.AdamW(fused=True)``.
The kernel here does the whole rule in registers: 7 words per element, the floor for any
rule that keeps two moments.

One launch covers every tensor of a device/dtype bucket, as torch's fused AdamW does: a
few hundred launches from Python would leave a small model's GPU waiting on the host.
Each program updates one block of one tensor; a block table (which tensor, which offset),
cached per bucket layout, maps programs to blocks, and the tensors are addressed as
element offsets from the bucket's first parameter (sent to the device only when an
address changed). Full blocks load and store unmasked, and with 16-element aligned
offsets (the allocator's usual case) the compiler is told so, which keeps loads 16 bytes
wide.

The step-dependent scalars (bias corrections, ADOPT's clip value, the schedule's lr and
decay multiplier) are kernel arguments, not compile-time constants, so a kernel compiles
once per dtype, rule and alignment, and never again as the step advances. Arithmetic is
float32 (round-to-nearest sqrt and division); parameters and state keep their own dtype.

Tests run the kernel on the CPU through Triton's interpreter: ``TRITON_INTERPRET=1`` must be
set before this module is imported (or the module reloaded), as ``triton.jit`` reads it then.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.distributed.tensor import DTensor

BLOCK_SIZE = 2048
"""Elements per program: 8 float32 per thread at 8 warps, 16-byte loads on all four arrays."""
NUM_WARPS = 8
ALIGNMENT = 16
"""Element offsets divisible by this are declared aligned to the compiler."""
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Parameter dtypes the kernel takes; others (float64) use the foreach path."""
QHADAM, ADOPT = 0, 1
"""The rules, as the kernel's compile-time ``RULE``."""
_CACHE_SIZE = 16


@triton.jit
def _update(p, g, m, v, lr, beta1, beta2, eps, decay, coupled_wd, a, b, c, d, RULE: tl.constexpr):
    """One element's update in float32; returns the new (p, m, v).

    QHADAM (:class:`..qhadamw.QHAdamW`): numerator ``a*m + b*g``, denominator
    ``sqrt(c*v + d*g*g) + eps``. ADOPT (:class:`..qhadopt.QHADOPT`, after its seeding step):
    ``nu = a``, clip value ``b``; ``c`` and ``d`` are unused.
    """
    p = p * decay
    g = g + coupled_wd * p
    if RULE == 0:
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * (g * g)
        denom = tl.sqrt_rn(v * c + d * (g * g)) + eps
        p = p - lr * tl.div_rn(m * a + b * g, denom)
    else:
        normed = tl.div_rn(g, tl.maximum(tl.sqrt_rn(v), eps))
        normed = tl.minimum(tl.maximum(normed, -b), b)
        m = m + (1.0 - beta1) * (normed - m)
        p = p - lr * (a * m + (1.0 - a) * normed)
        v = v * beta2 + (1.0 - beta2) * (g * g)
    return p, m, v


@triton.jit
def _update_block(base, p_off, g_off, m_off, v_off, idx, mask, lr, beta1, beta2, eps, decay,
                  coupled_wd, a, b, c, d, RULE: tl.constexpr):
    p = tl.load(base + p_off + idx, mask=mask).to(tl.float32)
    g = tl.load(base + g_off + idx, mask=mask).to(tl.float32)
    m = tl.load(base + m_off + idx, mask=mask).to(tl.float32)
    v = tl.load(base + v_off + idx, mask=mask).to(tl.float32)
    p, m, v = _update(p, g, m, v, lr, beta1, beta2, eps, decay, coupled_wd, a, b, c, d, RULE)
    tl.store(base + p_off + idx, p.to(base.dtype.element_ty), mask=mask)
    tl.store(base + m_off + idx, m.to(base.dtype.element_ty), mask=mask)
    tl.store(base + v_off + idx, v.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _multi_tensor_kernel(base, offsets, block_tensor, block_start, numels, n_tensors,
                         lr, beta1, beta2, eps, decay, coupled_wd, a, b, c, d,
                         RULE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Program i updates block i of the bucket: tensor ``block_tensor[i]`` from element
    ``block_start[i]``. ``offsets`` holds the element offsets from ``base`` of all params,
    then all grads, moments and second moments."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
    n = tl.load(numels + t)
    p_off = tl.load(offsets + t)
    g_off = tl.load(offsets + n_tensors + t)
    m_off = tl.load(offsets + 2 * n_tensors + t)
    v_off = tl.load(offsets + 3 * n_tensors + t)
    if ALIGNED:
        p_off = tl.multiple_of(p_off, 16)
        g_off = tl.multiple_of(g_off, 16)
        m_off = tl.multiple_of(m_off, 16)
        v_off = tl.multiple_of(v_off, 16)
    idx = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _update_block(base, p_off, g_off, m_off, v_off, idx, None, lr, beta1, beta2, eps, decay,
                      coupled_wd, a, b, c, d, RULE)
    else:
        _update_block(base, p_off, g_off, m_off, v_off, idx, idx < n, lr, beta1, beta2, eps,
                      decay, coupled_wd, a, b, c, d, RULE)


@dataclass
class _Layout:
    """Device tables mapping programs to (tensor, first element) for one bucket shape."""

    block_tensor: Tensor
    block_start: Tensor
    numels: Tensor

    @classmethod
    def build(cls, numels: tuple[int, ...], device: torch.device) -> _Layout:
        sizes = torch.tensor(numels, dtype=torch.int64)
        blocks = (sizes + BLOCK_SIZE - 1) // BLOCK_SIZE
        block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
        first_block = torch.cumsum(blocks, 0) - blocks
        block_start = (torch.arange(len(block_tensor)) - first_block[block_tensor]) * BLOCK_SIZE
        return cls(block_tensor.to(device), block_start.to(device), sizes.to(device))


_layouts: dict[tuple[torch.device, tuple[int, ...]], _Layout] = {}
_offsets: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}


_K, _V = TypeVar("_K"), TypeVar("_V")


def _cached(cache: dict[_K, _V], key: _K, make: Callable[[], _V]) -> _V:
    """``cache[key]``, made on a miss; the cache is bounded (layouts settle after step 1)."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        value = cache[key] = make()
    return value


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _local(t: Tensor) -> Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def supports_fused(params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
    """Whether the kernel can update these parameters in place (else use the foreach path).

    Only parameters and gradients are checked: the moments are created (and loaded) with
    their parameter's dtype and layout. Cheap on purpose, it runs every step.
    """
    interpret = _interpreting()
    dtype = _local(params[0]).dtype
    for t in (*params, *grads):
        local = _local(t)
        if local.dtype != dtype or dtype not in FUSED_DTYPES or not local.is_contiguous():
            return False
        if local.device.type != "cuda" and not (interpret and local.device.type == "cpu"):
            return False
    return True


def check_fused_device(params: Sequence[Tensor]) -> None:
    """Raise unless every parameter lives where the kernel runs (CUDA, or CPU when
    interpreting); called when a ``fused=True`` group is added."""
    interpret = _interpreting()
    for p in params:
        device = _local(p).device.type
        if device != "cuda" and not (interpret and device == "cpu"):
            raise ValueError(f"fused=True needs CUDA parameters, got one on {device!r}")


def _launch(rule: int, bucket_lists: Sequence[Sequence[Tensor]], *scalars: float) -> None:
    """Update the bucket ``(params, grads, exp_avgs, exp_avg_sqs)`` in one launch."""
    rows = [(p, g, m, v) for p, g, m, v in zip(*([_local(t) for t in lst] for lst in bucket_lists),
                                                strict=True) if p.numel()]
    if not rows:
        return
    base = rows[0][0]
    device, itemsize, base_address = base.device, base.element_size(), base.data_ptr()
    layout = _cached(_layouts, (device, tuple(r[0].numel() for r in rows)),
                     lambda: _Layout.build(tuple(r[0].numel() for r in rows), device))
    distances = tuple(row[k].data_ptr() - base_address for k in range(4) for row in rows)
    if any(d % itemsize for d in distances):
        raise RuntimeError("fused optimizer: a tensor is not aligned to its element size")
    elements = [d // itemsize for d in distances]

    def upload() -> Tensor:
        host = torch.tensor(elements, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()  # so that the copy does not wait for the device
        return host.to(device, non_blocking=True)

    offsets = _cached(_offsets, (device, distances), upload)
    aligned = all(e % ALIGNMENT == 0 for e in elements)
    # float(): an int hyperparameter (weight_decay=0) would give the kernel another signature.
    args = (float(s) for s in scalars)
    _multi_tensor_kernel[(len(layout.block_tensor),)](
        base, offsets, layout.block_tensor, layout.block_start, layout.numels, len(rows), *args,
        RULE=rule, ALIGNED=aligned, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)


def qhadam_step(bucket_lists: Sequence[Sequence[Tensor]], *, lr: float, betas: tuple[float, float],
                nus: tuple[float, float], eps: float, decay: float, coupled_wd: float,
                step: float) -> None:
    """QHAdam over parallel lists ``(params, grads, exp_avgs, exp_avg_sqs)`` at ``step``."""
    (beta1, beta2), (nu1, nu2) = betas, nus
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    _launch(QHADAM, bucket_lists, lr, beta1, beta2, eps, decay, coupled_wd,
            nu1 / bc1, 1.0 - nu1, nu2 / bc2, 1.0 - nu2)


def adopt_step(bucket_lists: Sequence[Sequence[Tensor]], *, lr: float, betas: tuple[float, float],
               nu: float, eps: float, decay: float, coupled_wd: float,
               clip: float | None) -> None:
    """One (QH)ADOPT update over parallel lists ``(params, grads, exp_avgs, exp_avg_sqs)``."""
    beta1, beta2 = betas
    _launch(ADOPT, bucket_lists, lr, beta1, beta2, eps, decay, coupled_wd, nu,
            math.inf if clip is None else clip, 0.0, 0.0)
