"""Which process is which, from the kernel's records (``/proc``), for telling a live holder
of something (a run folder, a checkpoint lease) from a dead one.

A pid alone names nothing for long: pids are recycled. A pid with its start time (clock ticks
since boot) names one process for as long as the machine is up; with the boot id and the pid
namespace beside them it names one process on one machine, ever. A record made elsewhere (another
host, another container, before a reboot) cannot be checked here: :func:`is_gone` says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22),
    or None when there is no such process (or no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def start_time(pid: int) -> float | None:
    """Unix time at which the process started (its interpreter's start-up counts), or None."""
    ticks = start_ticks(pid)
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None if ticks is None else time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def _namespace() -> str | None:
    """This machine's boot and this process's pid namespace: where a pid means one process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


@dataclass(frozen=True)
class ProcessId:
    """One process: pid and start ticks, valid within ``namespace`` (see the module docstring)."""

    pid: int
    ticks: int | None
    namespace: str | None

    @classmethod
    def this_process(cls) -> ProcessId:
        return cls(os.getpid(), start_ticks(os.getpid()), _namespace())

    def is_gone(self) -> bool:
        """True only when this process is known to have ended: it was recorded in this
        machine's boot and pid namespace, and its pid is free or names a younger process.
        False when it runs, or when it cannot be known from here."""
        if self.namespace is None or self.ticks is None or self.namespace != _namespace():
            return False
        return start_ticks(self.pid) != self.ticks
