"""The bundled corpus: English prose that exists offline wherever CPython does.

``pydoc_data.topics`` is the Python language reference and library topics as plain text
(several hundred KB, one document per topic), shipped inside every CPython installation
and every ``python`` container image because ``help()`` reads it. A fresh machine, a CI
runner or a cluster node without network access can therefore always train on real
English, with no download and no file to ship. It is a smoke-test corpus: enough for a
small model's loss to fall, not for a model worth keeping.
"""

from __future__ import annotations

import sys


def bundled_documents() -> list[str]:
    """Every topic's text, in a fixed (sorted by topic) order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def bundled_source() -> str:
    """A label naming the corpus and the Python that supplied it (its text differs by version)."""
    return f"pydoc_data.topics (CPython {sys.version.split()[0]})"
