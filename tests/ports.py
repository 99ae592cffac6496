"""Ports for what the tests start: a default when it is free, else any free one.

On `sys.path` through pytest's `pythonpath` setting (pyproject.toml).
"""

from __future__ import annotations

import socket


def port_free(port: int) -> bool:
    """Nothing listens on `port` (any interface)."""
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the kernel says is free now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
