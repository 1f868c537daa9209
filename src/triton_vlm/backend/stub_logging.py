"""Logging and crash reports of a Python stub (imports neither torch nor Triton's utilities: every model uses it,
the light forwarder included)."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal

#: The signal that makes a stub print every thread's Python stack to its stderr (Triton's log) and go on.
STACKS_SIGNAL = signal.SIGUSR1


def configure_logging() -> None:
    """Log ``triton_vlm`` records to the stub's stderr, which lands in Triton's log; one handler per process.

    ``TRITON_VLM_LOG_LEVEL`` (default INFO; ``triton-vlm serve --log-level debug`` sets it) picks the level:
    DEBUG adds one line per request. A stub that dies of a fatal signal leaves every thread's Python stack there,
    and so does a stub sent :data:`STACKS_SIGNAL` (the launcher's stop asks a server that does not stop in time).
    """
    faulthandler.enable(all_threads=True)
    faulthandler.register(STACKS_SIGNAL, all_threads=True)
    root = logging.getLogger("triton_vlm")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[triton_vlm] %(levelname)s %(message)s"))
        root.addHandler(handler)
        level = os.environ.get("TRITON_VLM_LOG_LEVEL", "INFO").strip().upper() or "INFO"
        root.setLevel(level if isinstance(logging.getLevelName(level), int) else logging.INFO)


def quiet_teardown() -> None:
    """Stop crash reports once a model is finalized: the stub's native teardown that follows can segfault
    (no Python frame, no request left), which would print a fatal-error report at every normal stop."""
    faulthandler.disable()  # STACKS_SIGNAL still prints stacks: a registered signal is not a crash report


#: A file the launcher names for the reasons models failed at start (one line each); it prints them last.
STARTUP_ERRORS_ENV = "TRITON_VLM_STARTUP_ERRORS"


def startup_failed(model: str, exc: BaseException) -> None:
    """``initialize`` of ``model`` is about to raise ``exc`` (e.g. preloading weights that are not here).

    Triton then ends the stub, whose native teardown segfaults as after a finalize: without
    :func:`quiet_teardown` the log would end in a "Fatal Python error: Segmentation fault" report that buries the
    reason. The reason also goes to the launcher's file, so it can say it last and plainly."""
    quiet_teardown()
    path = os.environ.get(STARTUP_ERRORS_ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as errors:
                reason = str(exc) if repr(model) in str(exc) else f"{model}: {exc}"
                errors.write(" ".join(reason.split()) + "\n")  # one line per failure
        except OSError:
            pass  # the reason is in Triton's log regardless
