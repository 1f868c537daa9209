"""The decoupled ``<model>_stream`` Triton model: triton-vlm's engine, with token streaming.

A thin ``TritonPythonModel`` over three parts, each with its own thread:

- :class:`~triton_vlm.backend.engine_service.EngineService` ("triton-vlm-engine-service"): builds the engine on
  first use (or at ``--preload``), then validates, tokenizes and submits each request; the engine runs its loop on
  its own thread ("triton-vlm-engine");
- :class:`~triton_vlm.backend.responses.ResponseLoop` ("triton-vlm-responses"): sends every engine request's
  deltas and its FINAL response, and aborts what clients cancelled;
- :class:`~triton_vlm.backend.batched_tasks.BatchedTasks` ("triton-vlm-tasks"): tasks the engine does not run
  (moondream2's captions, detect and point), through the family's batched loop.

``execute`` only admits requests (the overload bound, :class:`~triton_vlm.backend.stream_requests.Admission`) and
queues them for the engine service, so it returns at once and Triton keeps feeding requests while the engine
batches them continuously. Nothing leaves ``execute``: any exception becomes that request's error response.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import Any, ClassVar

from triton_vlm.backend.batched_tasks import BatchedTasks
from triton_vlm.backend.engine_service import EngineService, build_engine
from triton_vlm.backend.faults import FaultInjection
from triton_vlm.backend.metrics import BackendMetrics, EngineMetrics
from triton_vlm.backend.requests import declared_extra_outputs, runtime_from_args
from triton_vlm.backend.responses import ResponseLoop
from triton_vlm.backend.stream_requests import Admission, refuse
from triton_vlm.backend.stub_logging import configure_logging, quiet_teardown, startup_failed

log = logging.getLogger("triton_vlm")

#: How long finalize waits for each of its parts (the engine service with the engine, the response loop, the
#: batched tasks): 18 s in all, inside Triton's 30 s exit timeout (by then Triton has let every in-flight request
#: finish, so the threads have nothing left to do).
FINALIZE_WAIT_S = 6.0


class TritonVLMStreamModel:
    """Base for the ``<m>_stream/1/model.py`` the launcher renders; subclasses set :attr:`family`."""

    family: ClassVar[str | None] = None

    def initialize(self, args: dict[str, str]) -> None:
        configure_logging()
        # Busy threads share this process (execute, engine service, engine, responses): hand the GIL over sooner
        # than the default 5 ms so a decode step never waits a whole interval for it.
        sys.setswitchinterval(0.0005)
        self.runtime = runtime_from_args(args, self.family)
        settings = self.runtime.settings
        self.model_name = settings.model_name
        self.metrics = BackendMetrics(self.model_name)
        self.metrics.note_weights(self.runtime)
        extra_outputs = declared_extra_outputs(args, self.runtime.family.extra_outputs)
        # At most max_num_seqs requests run and max_queue_size wait (0: no bound).
        self.admission = Admission(self.model_name, settings.engine.max_num_seqs + settings.engine.max_queue_size
                                   if settings.engine.max_queue_size > 0 else None)
        self.responses = ResponseLoop(self.runtime, self.metrics, EngineMetrics(self.model_name), extra_outputs)
        self.tasks = BatchedTasks(self.runtime, self.metrics, extra_outputs)
        self.service = EngineService(self.runtime, self.metrics, self.responses, self.tasks,
                                     functools.partial(build_engine, self.runtime), FaultInjection.from_env(),
                                     prepare_workers=settings.engine.prepare_threads())
        for part in (self.responses, self.tasks, self.service):
            part.start()
        if settings.weights.preload:
            try:
                self.service.preload()  # on the service's thread; a model that cannot build fails its load
            except BaseException as exc:
                startup_failed(self.model_name, exc)
                self._stop()
                raise

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = None
            try:
                sender = request.get_response_sender()
                self.service.submit(self.admission.admit(request, sender, time.perf_counter()))
            except Exception as exc:  # the error boundary: the request ends with its error, the batch goes on
                if sender is None:
                    log.exception("model %s: a request without a response sender", self.model_name)
                else:
                    refuse(sender, exc, self.metrics)
        return None

    def finalize(self) -> None:
        # Triton waits exit_timeout (30 s) for every model to unload at shutdown and exits 1 past it: the waits
        # here stay well within it, and what did not stop in time is named in the log. The service stops first
        # (nothing new reaches the engine), the engine's shutdown aborts what runs, and the response loop still
        # ends every open request FINAL.
        started = time.monotonic()
        # A line before the waits: a stop that hangs then shows whether Triton ever asked this model to unload.
        log.info("model %s: unloading", self.model_name)
        stuck = self._stop()
        if stuck:
            log.warning("model %s: %s still running at unload", self.model_name, ", ".join(stuck))
        log.info("model %s unloaded in %.1fs", self.model_name, time.monotonic() - started)
        quiet_teardown()

    def _stop(self) -> list[str]:
        """Stop every part, at most FINALIZE_WAIT_S each; names what did not stop."""
        stuck = self.service.stop(FINALIZE_WAIT_S)
        for part in (self.responses, self.tasks):
            if not part.stop(FINALIZE_WAIT_S):
                stuck.append(f"thread {part.name}")
        return stuck

