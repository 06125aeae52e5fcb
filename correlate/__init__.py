"""Linking events into spans and traces: pure functions over the event stream.

The same :class:`correlate.engine.Correlator` runs live inside ``sniff run``
(fed by the capture writer's thread) and offline over a capture file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from importlib.machinery import ModuleSpec

# The modules that setup.py compiles with mypyc (one shared library, _native__mypyc).
# Compiled modules call each other natively, so it is all of them or none: the Python
# sources are imported instead when SNIFF_PURE_PYTHON=1, or when a source is newer than
# the build (an edited checkout that was not reinstalled), with a warning.
COMPILED = ("model", "identity", "shared_ids", "causal", "amqp", "sql", "http", "engine", "offline")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _built() -> float | None:
    """When the compiled correlator was built (None: it was not)."""
    try:
        names = [n for n in os.listdir(_HERE) if n.startswith("_native__mypyc.")]
    except OSError:
        return None
    return os.stat(os.path.join(_HERE, names[0])).st_mtime if names else None


def _stale(built: float) -> list[str]:
    out = []
    for m in COMPILED:
        try:
            # 5 s: a wheel's files are unpacked in any order, within a moment of each other
            if os.stat(os.path.join(_HERE, m + ".py")).st_mtime > built + 5:
                out.append(m + ".py")
        except OSError:
            pass
    return out


class _Sources:
    """Finds the compiled modules' Python sources ahead of their extension modules."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> ModuleSpec | None:
        pkg, _, mod = fullname.partition(".")
        if pkg != "correlate" or mod not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(_HERE, mod + ".py"))


NATIVE = False  # True: the mypyc-compiled correlator is what runs
_b = _built()
if _b is not None:
    _old = _stale(_b)
    if os.environ.get("SNIFF_PURE_PYTHON") == "1" or _old:
        if _old:
            logging.getLogger("sniff").warning(
                "correlate: %s changed after the compiled correlator was built; running the "
                "Python sources (rebuild: pip install -e .)",
                ", ".join(_old),
            )
        sys.meta_path.insert(0, _Sources())
    else:
        NATIVE = True
