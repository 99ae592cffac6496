"""Backends: the one registry of where a job can run.

Each backend is a module that keeps the :class:`~fljob.backends.base.Backend` contract: pure
``check``/``render``/``plan`` and thin ``submit``/``status``/``logs``/``cancel``. The CLI, the
doctor and job handles find them here, by the name that is both ``--backend`` and the
handle's scheme. Modules are imported on first use, so ``fljob validate --backend slurm``
loads one renderer and nothing else.
"""

from __future__ import annotations

import importlib
from typing import cast

from fljob.backends.base import BACKEND_NAMES, Backend, Handle

_MODULES = {"local": "fljob.backends.local", "slurm": "fljob.backends.slurm", "k8s": "fljob.backends.kubernetes"}
assert tuple(_MODULES) == BACKEND_NAMES


def get(name: str) -> Backend:
    """The backend called ``name`` (one of BACKEND_NAMES)."""
    return cast(Backend, importlib.import_module(_MODULES[name]))


def for_handle(handle: Handle) -> Backend:
    return get(handle.backend)


__all__ = ["BACKEND_NAMES", "Backend", "Handle", "for_handle", "get"]
