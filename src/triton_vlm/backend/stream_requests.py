"""A ``<model>_stream`` request from admission to its FINAL response, and the bound on how many are open.

``execute`` (Triton's thread) admits each request as an :class:`OpenRequest` and hands it to the engine service.
From then on one thread at a time holds it: the engine service, then either the response loop (engine requests)
or the batched tasks (tasks the engine does not run). Whoever holds it last ends it with :meth:`OpenRequest.finish`
or :meth:`OpenRequest.fail`, which send the FINAL response and give its place in :class:`Admission` back, once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import triton_python_backend_utils as pb_utils

from triton_vlm.backend.metrics import BackendMetrics
from triton_vlm.backend.python_model import failure_response
from triton_vlm.errors import ModelUnavailableError

log = logging.getLogger("triton_vlm")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Admission:
    """The engine model's own overload bound: requests admitted and not yet ended, at most ``limit`` (None: no
    bound). ``execute`` returns at once, so Triton's queue never fills; the bound is here instead.

    :meth:`admit` runs on Triton's execute thread and a request's end on whichever thread ends it: the count is
    guarded by a lock.
    """

    def __init__(self, model_name: str, limit: int | None) -> None:
        self.model_name = model_name
        self.limit = limit
        self._open = 0
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        """Requests admitted and not ended yet."""
        with self._lock:
            return self._open

    def admit(self, request: Any, sender: Any, received: float) -> OpenRequest:
        """Count ``request`` in, or raise :class:`ModelUnavailableError` (overloaded) when the bound is reached."""
        with self._lock:
            if self.limit is not None and self._open >= self.limit:
                raise ModelUnavailableError(
                    f"model {self.model_name!r} is overloaded: {self._open} requests are running or waiting "
                    f"in its engine (limit {self.limit}); retry with backoff")
            self._open += 1
        return OpenRequest(request, sender, received, self._release)

    def _release(self) -> None:
        with self._lock:
            self._open -= 1


@dataclass(eq=False)
class OpenRequest:
    """One admitted request, held by one thread at a time (see the module docstring)."""

    #: Triton's ``InferenceRequest``; its inputs are read on the engine service's thread.
    triton_request: Any
    sender: Any
    #: ``time.perf_counter()`` when execute got it.
    received: float
    release: Callable[[], None]
    #: The engine's id for it, given by the engine service ("" until then).
    request_id: str = ""
    ended: bool = False
    #: ``time.perf_counter()`` when the engine service took it up, had read its inputs (images decoded), and had
    #: prepared it for the engine (processor, template, tokens, prefix keys); 0.0 until then.
    started: float = 0.0
    parsed: float = 0.0
    prepared: float = 0.0

    @property
    def is_cancelled(self) -> Callable[[], bool] | None:
        """Triton's probe of whether the client cancelled the request (an IPC round trip per call)."""
        return getattr(self.sender, "is_cancelled", None)

    def send(self, response: Any) -> None:
        """A response that is not the last (a streamed delta)."""
        self.sender.send(response)

    def finish(self, response: Any = None) -> None:
        """End the request: ``response`` (None: the bare FINAL flag) with the FINAL flag. Never raises, and ends a
        request only once: a client that went away still gets the flag, because Triton keeps a model loaded until
        every request ended."""
        if self.ended:
            return
        self.ended = True
        try:
            if response is None:
                self.sender.send(flags=FINAL)
            else:
                self.sender.send(response, flags=FINAL)
        except Exception:
            log.exception("sending a response failed")
            if response is not None:
                send_final(self.sender)
        finally:
            # Let go of Triton's objects now, not when a reference cycle is collected: the response sender holds
            # Triton's response factory, which holds the model, and a model whose factories live on never finishes
            # unloading (python_backend #358; vllm_backend deletes its senders for the same reason).
            self.sender, self.triton_request = ENDED, None
            self.release()

    def fail(self, exc: BaseException, metrics: BackendMetrics) -> None:
        """End the request with ``exc`` as its error response, whatever the exception (see ``failure_response``)."""
        try:
            response = failure_response(metrics, exc)
        except Exception:  # never leave a request open, not even for a bug in building its error
            log.exception("building an error response failed")
            response = None
        self.finish(response)


def refuse(sender: Any, exc: BaseException, metrics: BackendMetrics) -> None:
    """End a request that was never admitted (overloaded, or execute failed on it) with its error; never raises."""
    OpenRequest(None, sender, 0.0, release=_nothing).fail(exc, metrics)


def _nothing() -> None:
    """An unadmitted request holds no place in :class:`Admission`."""


class _EndedSender:
    """What an ended request holds instead of its response sender: it sends nothing and reads as cancelled."""

    def send(self, *_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("the request has already ended: nothing more can be sent")

    @staticmethod
    def is_cancelled() -> bool:
        return True


ENDED = _EndedSender()


def send_final(sender: Any) -> None:
    """The bare FINAL flag, whatever state the client is in; never raises."""
    try:
        sender.send(flags=FINAL)
    except Exception:
        log.debug("final flag not delivered", exc_info=True)
