"""Pick the training device and make torchtitan 0.2.2 train on the CPU.

torchtitan chooses its device once, when ``torchtitan.tools.utils`` is first imported:
``_get_available_device_type() or "cuda"``, copied by value into its metrics, distributed
and parallel-dims modules. Without an accelerator that is "cuda", and the trainer dies in
``torch.cuda.set_device``. :func:`use_device` therefore runs before anything imports
torchtitan: for "cpu" it makes that first import see "cpu" and a device module that offers
what the trainer and its memory monitor call; for "cuda" it does nothing.

torch 2.11 to 2.13 need no further shims for torchtitan 0.2.2 (its ``set_pg_timeouts``
uses ``_set_pg_timeout``, which all three have); gloo's missing PREMUL_SUM/AVG reductions
are handled where FSDP is applied (``fljob.trainer.model.parallelize``).
"""

from __future__ import annotations

import os
import resource
import sys
import types
from typing import Any, Literal

import torch
import torch._utils

Device = Literal["cpu", "cuda"]


def resolve_device(requested: Literal["auto", "cpu", "cuda"]) -> Device:
    """The spec's ``training.device``, with "auto" meaning CUDA when torch sees a GPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but torch sees no CUDA device")
    return requested


class CpuDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the CUDA-style calls torchtitan makes on its device module.

    Memory statistics report the process's peak resident set size, the closest CPU
    analogue of CUDA's peak reserved bytes.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    def current_device(self) -> int:
        return 0  # torch.distributed.barrier(device_ids=[...]) needs an int

    def set_device(self, device: Any) -> None:
        del device

    def get_device_name(self, device: Any = None) -> str:
        return "cpu"

    def get_device_properties(self, device: Any = None) -> types.SimpleNamespace:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return types.SimpleNamespace(name="cpu", total_memory=total)

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak,
                "num_alloc_retries": 0, "num_ooms": 0}

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        del device

    def empty_cache(self) -> None:
        pass


def use_device(device: Device) -> None:
    """Make torchtitan train on ``device``; call before the first torchtitan import.

    Idempotent; raises if torchtitan was already imported with another device.
    """
    loaded = sys.modules.get("torchtitan.tools.utils")
    if loaded is not None:
        if loaded.device_type != device:
            raise RuntimeError(f"torchtitan was imported for {loaded.device_type!r} before "
                               f"fljob could select {device!r}")
        return
    if device == "cuda":
        return
    detect, module_of = torch._utils._get_available_device_type, torch._utils._get_device_module
    cpu = CpuDeviceModule("fljob_cpu_device")
    torch._utils._get_available_device_type = lambda: "cpu"
    torch._utils._get_device_module = lambda kind=None: cpu if kind in (None, "cpu") else module_of(kind)
    try:
        import torchtitan.tools.utils  # noqa: F401  (binds device_type/device_module once)
    finally:  # torch itself is left untouched
        torch._utils._get_available_device_type, torch._utils._get_device_module = detect, module_of


def set_cpu_threads() -> int:
    """Give each local rank an equal share of this process's CPUs for intra-op work.

    torchrun sets OMP_NUM_THREADS=1 for every multi-process job, which suits GPU workers
    but starves CPU training on a machine with more cores than ranks; a lone process
    would otherwise use every core even when others share the node.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, len(os.sched_getaffinity(0)) // local_world)
    torch.set_num_threads(threads)
    return threads
