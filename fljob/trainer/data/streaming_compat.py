"""Import mosaicml-streaming 0.13.0 without torchvision or transformers.

``import streaming`` imports its vision and text subpackages, which import a handful of
names from torchvision (``VisionDataset``, ``to_tensor``) and transformers (two batch types
used only in ``isinstance`` checks, ``AutoTokenizer`` for datasets fljob never uses). fljob
installs streaming without its declared dependencies: they pin numpy < 2.2, and the
torchvision wheel that matches torch 2.13 is a CUDA build whose extension fails to load with
CPU torch. Where a real torchvision or transformers imports, it is used; otherwise a
placeholder module with a real ``ModuleSpec`` stands in, whose names raise if anything ever
calls them, so a silent wrong answer is impossible.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from typing import Any

PLACEHOLDER_NAMES = {
    "torchvision.datasets": ("VisionDataset",),
    "torchvision.transforms.functional": ("to_tensor",),
    "transformers.feature_extraction_utils": ("BatchFeature",),
    "transformers.tokenization_utils_base": ("BatchEncoding",),
    "transformers.models.auto.tokenization_auto": ("AutoTokenizer",),
}
"""Module -> names that streaming imports from it at import time."""


def _unavailable(qualname: str) -> type:
    """A class that refuses to be instantiated or used, naming what is missing."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{qualname} is a placeholder: install the real package to use it "
                           "(fljob's data path never needs it)")

    return type(qualname.rsplit(".", 1)[-1], (), {"__new__": fail, "from_pretrained": fail})


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken CUDA build raises RuntimeError/OSError too
        return False
    return True


def _install_placeholder(top: str) -> None:
    for module_name, names in PLACEHOLDER_NAMES.items():
        if not module_name.startswith(top + "."):
            continue
        parts = module_name.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name not in sys.modules:
                module = types.ModuleType(name)
                module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
                module.__path__ = []
                sys.modules[name] = module
                if depth > 1:
                    setattr(sys.modules[".".join(parts[:depth - 1])], parts[depth - 1], module)
        for attr in names:
            setattr(sys.modules[module_name], attr, _unavailable(f"{module_name}.{attr}"))


def import_streaming() -> types.ModuleType:
    """``import streaming``, with placeholders for whichever optional package is unusable.

    Both packages are probed before either placeholder is registered: transformers itself
    probes torchvision and would trip over a placeholder.
    """
    if "streaming" not in sys.modules:
        missing = [top for top in ("torchvision", "transformers") if not _importable(top)]
        for top in missing:
            sys.modules.pop(top, None)
            _install_placeholder(top)
    return importlib.import_module("streaming")
