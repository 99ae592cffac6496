"""What every trainer benchmark shares: the device, a timer, and the results file's header.

Timing follows the device method: warm up first, synchronise around the timed region (CUDA
events on a GPU, the host clock on a CPU), repeat, report the median. Each results file
states the machine, the GPU, the versions and the exact command, so a figure can be traced
to the run that produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
H100_BF16_DENSE_PEAK_FLOPS = 989e12
"""H100 SXM dense bf16 peak (no sparsity): the MFU denominator the issue names."""


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeat: int,
            clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Milliseconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls.

    CUDA events on a GPU; ``clock`` (seconds) on the CPU.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = clock()
            fn()
            times.append((clock() - t0) * 1e3)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeat: int = 20) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median(time_ms(lambda: dst.copy_(src), device, warmup=3, repeat=repeat))
    return 2 * n * 4 / (ms / 1e3)


def header(title: str, device: torch.device) -> list[str]:
    """The results file's first lines: title, date, machine, device, versions, command."""
    import triton

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    else:
        gpu = "none (CPU run)"
    try:
        import torchtitan
        titan = getattr(torchtitan, "__version__", None) or _dist_version("torchtitan")
    except ImportError:
        titan = "not installed"
    return [
        f"# {title}",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        (f"- machine: {platform.node()} ({platform.machine()}, {_cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end)"),
        f"- device: {device.type}; GPU: {gpu}",
        (f"- versions: Python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), triton {triton.__version__}, torchtitan {titan}"),
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        "",
    ]


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def write_results(path: Path, lines: list[str]) -> None:
    """Write the results file and echo it (the device's output tail carries the end)."""
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


def table(columns: list[str], rows: list[list[object]]) -> list[str]:
    """A markdown table."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out
