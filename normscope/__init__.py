"""normscope: measure velocity-norm inflation of RL-tuned flow-matching image generators.

The top-level names are imported lazily so that ``normscope --help`` does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "compare": "normscope.commands.compare",
    "CompareResult": "normscope.commands.compare",
    "CompareConfig": "normscope.config",
    "ProbeConfig": "normscope.config",
    "capture": "normscope.measure.capture",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normscope' has no attribute {name!r}")
