"""Named points where the fault-injection tests kill a run (``NORMSCOPE_FAILPOINT=name``), as kill -9 would.

A failpoint costs one dictionary look-up when the variable is unset. The tests use them to stop a run at
the exact moments that matter (mid-publish, between two files) instead of hoping a timer lands there.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "NORMSCOPE_FAILPOINT"


def failpoint(name: str) -> None:
    if os.environ.get(VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
