"""Fused update paths: one Triton kernel per tensor reads p, g, m, v once and writes p, m, v once.

Why: an optimizer step on a GPU is bound by memory traffic, not arithmetic. The foreach
paths of :mod:`.qhadamw` and :mod:`.qhadopt` run about ten elementwise passes over the
parameter lists (every foreach op reads and writes whole tensors, and some allocate
temporaries), so they move two to three times the bytes of ``torch.optim.AdamW(fused=True)``.
These kernels do the whole rule in registers: 7 words per element, the floor for any rule
that keeps two moments.

The step-dependent scalars (bias corrections, ADOPT's clip value, the schedule's lr and
decay multiplier) are kernel arguments, not compile-time constants, so a kernel compiles
once per dtype combination and never again as the step advances. Arithmetic is float32
(round-to-nearest sqrt and division); parameters and state keep their own dtype.

Kernels are built on first use, so Triton's CPU interpreter (``TRITON_INTERPRET=1``, how
the tests run them without a GPU) takes effect whenever it is set.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.distributed.tensor import DTensor

BLOCK_SIZE = 2048
"""Elements per program: 8 float32 per thread at 8 warps, 16-byte loads on all four arrays."""
NUM_WARPS = 8
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Parameter dtypes the kernels take; others (float64) use the foreach path."""


def _qhadam_rule(p_ptr, g_ptr, m_ptr, v_ptr, n_elements, lr, beta1, beta2, eps, decay, coupled_wd,
                 m_scale, g_scale, v_scale, g2_scale, BLOCK: tl.constexpr):
    """QHAdam/Adam, see :class:`..qhadamw.QHAdamW`: numerator ``m_scale*m + g_scale*g``,
    denominator ``sqrt(v_scale*v + g2_scale*g*g) + eps``."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    p = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
    p = p * decay
    g = g + coupled_wd * p
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    denom = tl.sqrt_rn(v * v_scale + g2_scale * (g * g)) + eps
    p = p - lr * tl.div_rn(m * m_scale + g_scale * g, denom)
    tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


def _adopt_rule(p_ptr, g_ptr, m_ptr, v_ptr, n_elements, lr, beta1, beta2, eps, decay, coupled_wd,
                nu, clip, BLOCK: tl.constexpr):
    """One (QH)ADOPT update after the seeding step, see :class:`..qhadopt.QHADOPT`."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    p = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
    p = p * decay
    g = g + coupled_wd * p
    normed = tl.div_rn(g, tl.maximum(tl.sqrt_rn(v), eps))
    normed = tl.minimum(tl.maximum(normed, -clip), clip)
    m = m + (1.0 - beta1) * (normed - m)
    p = p - lr * (nu * m + (1.0 - nu) * normed)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _jit(rule: Callable[..., None], interpret: bool) -> Any:
    del interpret  # part of the cache key: triton.jit reads TRITON_INTERPRET when it wraps
    return triton.jit(rule)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _local(t: Tensor) -> Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def supports_fused(params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
    """Whether the kernels can update these parameters in place (else use the foreach path).

    Only parameters and gradients are checked: the moments are created (and loaded) with
    their parameter's dtype and layout. Cheap on purpose, it runs every step.
    """
    interpret = _interpreting()
    for t in (*params, *grads):
        local = _local(t)
        if local.dtype not in FUSED_DTYPES or not local.is_contiguous():
            return False
        if local.device.type != "cuda" and not (interpret and local.device.type == "cpu"):
            return False
    return True


def check_fused_device(params: Sequence[Tensor]) -> None:
    """Raise unless every parameter lives where the kernels run (CUDA, or CPU when
    interpreting); called when a ``fused=True`` group is added."""
    interpret = _interpreting()
    for p in params:
        device = _local(p).device.type
        if device != "cuda" and not (interpret and device == "cpu"):
            raise ValueError(f"fused=True needs CUDA parameters, got one on {device!r}")


def _launch_each(rule: Callable[..., None], bucket_lists: Sequence[Sequence[Tensor]],
                 *scalars: float) -> None:
    """Launch ``rule`` once per tensor of the bucket ``(params, grads, exp_avgs, exp_avg_sqs)``.

    Kernel lookup and argument conversion happen once per bucket: with a few hundred
    tensors the host must stay ahead of the device.
    """
    kernel = _jit(rule, _interpreting())
    # float(): an int hyperparameter (weight_decay=0) would give the kernel another signature.
    args = tuple(float(s) for s in scalars)
    for tensors in zip(*bucket_lists, strict=True):
        p, g, m, v = (_local(t) for t in tensors)
        n = p.numel()
        if n:
            kernel[(triton.cdiv(n, BLOCK_SIZE),)](p, g, m, v, n, *args, BLOCK=BLOCK_SIZE,
                                                  num_warps=NUM_WARPS)


def qhadam_step(bucket_lists: Sequence[Sequence[Tensor]], *, lr: float, betas: tuple[float, float],
                nus: tuple[float, float], eps: float, decay: float, coupled_wd: float,
                step: float) -> None:
    """QHAdam over parallel lists ``(params, grads, exp_avgs, exp_avg_sqs)`` at ``step``."""
    (beta1, beta2), (nu1, nu2) = betas, nus
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    _launch_each(_qhadam_rule, bucket_lists, lr, beta1, beta2, eps, decay, coupled_wd,
                 nu1 / bc1, 1.0 - nu1, nu2 / bc2, 1.0 - nu2)


def adopt_step(bucket_lists: Sequence[Sequence[Tensor]], *, lr: float, betas: tuple[float, float],
               nu: float, eps: float, decay: float, coupled_wd: float,
               clip: float | None) -> None:
    """One (QH)ADOPT update over parallel lists ``(params, grads, exp_avgs, exp_avg_sqs)``."""
    beta1, beta2 = betas
    _launch_each(_adopt_rule, bucket_lists, lr, beta1, beta2, eps, decay, coupled_wd, nu,
                 math.inf if clip is None else clip)
