"""normscope: measure velocity-norm inflation of RL-tuned flow-matching image generators.

One function and one config per job, importable from the top level:

    from normscope import CompareConfig, compare
    result = compare(CompareConfig(tuned="run/checkpoint-300", pipeline="sd35-medium/"))

The top-level names are imported lazily so that ``import normscope`` and ``normscope --help`` do not
import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    # compare
    "compare": "normscope.commands.compare",
    "CompareResult": "normscope.commands.compare",
    "CompareConfig": "normscope.config",
    "ProbeConfig": "normscope.config",
    # profile
    "profile": "normscope.commands.profile",
    "ProfileConfig": "normscope.commands.profile",
    "Reference": "normscope.commands.profile",
    "load_reference": "normscope.commands.profile",
    # check
    "check": "normscope.commands.check",
    "CheckConfig": "normscope.commands.check",
    "CheckResult": "normscope.commands.check",
    # sweep
    "sweep": "normscope.commands.sweep",
    "SweepConfig": "normscope.commands.sweep",
    # report
    "report": "normscope.commands.report",
    "ReportConfig": "normscope.commands.report",
    # inspect
    "inspect_checkpoint": "normscope.commands.inspect",
    "InspectConfig": "normscope.commands.inspect",
    # demo
    "run_demo": "normscope.commands.demo",
    "DemoConfig": "normscope.commands.demo",
    # lower level
    "capture": "normscope.measure.capture",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
