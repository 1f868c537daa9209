"""Tasks a ``<model>_stream`` model's engine does not run (moondream2's captions, detect and point): one thread
("triton-vlm-tasks") runs them through the family's batched loop on the same loaded model, up to
:data:`TASK_BATCH` at a time, and answers each in one FINAL response. Its queue is fed by the engine service;
everything else here is the thread's own.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass

from triton_vlm.backend.metrics import BackendMetrics
from triton_vlm.backend.python_model import answer_response
from triton_vlm.backend.stream_requests import OpenRequest
from triton_vlm.backend.worker import InboxWorker
from triton_vlm.errors import TritonVLMError
from triton_vlm.models.generation import GenerationOutput
from triton_vlm.runtime import GenerationRequest, VLMRuntime, as_request_error

log = logging.getLogger("triton_vlm")

#: Requests of such tasks run together in one batched loop, at most this many.
TASK_BATCH = 8


@dataclass(frozen=True)
class _Task:
    request: OpenRequest
    generation: GenerationRequest


class BatchedTasks(InboxWorker[_Task]):
    """Runs tasks in batches on its own thread. Thread-safe entry points: :meth:`submit`, :meth:`stop`."""

    def __init__(self, runtime: VLMRuntime, metrics: BackendMetrics, extra_outputs: dict[str, str]) -> None:
        super().__init__("triton-vlm-tasks")
        self.runtime = runtime
        self.metrics = metrics
        self.extra_outputs = extra_outputs

    def submit(self, request: OpenRequest, generation: GenerationRequest) -> None:
        """Run ``generation`` for ``request``, which this component now ends."""
        self._inbox.put(_Task(request, generation))

    def stop(self, timeout: float) -> bool:
        """Finish the batch that runs, then stop; whether the thread stopped within ``timeout`` seconds."""
        return self._join(timeout)

    def _run(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < TASK_BATCH:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._inbox.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            try:
                results = list(self.runtime.generate([task.generation for task in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(batch)} requests")
            except Exception as exc:  # the runtime answers per request; this is for whatever escapes it
                log.exception("batched generation failed")
                results = [as_request_error(exc)] * len(batch)
            # Every request of the batch ends here, whatever happens: one left open keeps Triton from ever unloading
            # the model (its shutdown then times out).
            for task, result in zip(batch, results, strict=True):
                self._answer(task, result)

    def _answer(self, task: _Task, result: GenerationOutput | TritonVLMError) -> None:
        """One FINAL response: the answer, or the request's own error."""
        if isinstance(result, TritonVLMError):
            task.request.fail(result, self.metrics)
            return
        try:
            response = answer_response(self.metrics, self.extra_outputs, result, task.request.received,
                                       self.runtime.token_text)
        except Exception as exc:  # a bug in building the answer fails this request only
            task.request.fail(exc, self.metrics)
            return
        task.request.finish(response)
