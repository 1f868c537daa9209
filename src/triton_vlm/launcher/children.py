"""Child processes of the launcher (tritonserver, the OpenAI front, ``docker compose``): what every one of them
needs, in one place that :mod:`triton_vlm.launcher.server`, :mod:`triton_vlm.launcher.compose` and
:mod:`triton_vlm.openai.process` import (none of them imports another for it).

Each child runs in its own session (``start_new_session=True``: a terminal's Ctrl-C reaches only the launcher,
and the child's process group can be signalled as a whole) and gets SIGTERM when the launcher dies
(:func:`die_with_parent` as its ``preexec_fn``), so no child outlives its launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent", "signal_group"]

#: prctl's option that sets the signal a child gets when its parent thread dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM us when the launcher dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group that ``pid`` leads (a child and, e.g., its stubs); a group that is gone
    already, or not ours, is left alone."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
