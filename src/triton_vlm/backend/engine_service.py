"""The engine of a ``<model>_stream`` model, as a service on its own thread ("triton-vlm-engine-service").

Triton's ``execute`` only admits requests and queues them here. Each request's own work: read and validate its
inputs, build the engine if it is not built yet (weights, engine, CUDA graphs: never on Triton's execute thread),
tokenize the request (``engine.prepare``, where the processor runs) and submit it (a request for ``n`` choices too:
the engine runs one sequence per choice), or pass it to the batched tasks when the engine does not run its task.

This thread takes the requests in order. Until the engine is built it serves each one itself (the first builds
it); from then on it hands each to a pool of ``prepare_workers`` threads ("triton-vlm-prepare"), so a burst of
requests is prepared side by side: image decoding and processing let go of the GIL, and one processor call per
request after another would bound the engine's request rate (SmolVLM's, which tiles a 1536 px image: ~150 ms a
request on a CPU core). With one worker the service's thread does it all.

Requests that arrive while the engine builds wait in the queue and are served, in order, once it is ready. If the
build fails, the request that asked for it and every one waiting then get the build's error
(:class:`ModelUnavailableError`, or the load error), and the next request tries again.

One error boundary wraps each request's work (:meth:`EngineService._serve`): whatever it raises (a bad input, a
processor error, CUDA out of memory, a bug) becomes that request's error response, and the service goes on with the
next request.

Ownership: anyone puts into the inbox, only this thread takes from it; the engine is built and published
(:attr:`EngineService.engine`) by this thread and shut down by :meth:`EngineService.stop` once the thread and the
pool's work stopped. What the workers share is thread-safe: ``engine.prepare`` (the processor, the caches of
decoded and processed images), the response loop's and the engine's inboxes. The engine's own entry points
(``submit``, ``abort``) are thread-safe; its loop runs on the engine's thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from triton_vlm.backend.batched_tasks import BatchedTasks
from triton_vlm.backend.faults import FaultInjection
from triton_vlm.backend.metrics import BackendMetrics
from triton_vlm.backend.requests import input_scalar, parse_request
from triton_vlm.backend.responses import ResponseLoop
from triton_vlm.backend.stream_requests import OpenRequest
from triton_vlm.backend.worker import InboxWorker
from triton_vlm.engine import EngineRequest, LLMEngine, RequestOutput
from triton_vlm.errors import ModelUnavailableError, TritonVLMError
from triton_vlm.runtime import VLMRuntime
from triton_vlm.sampling import SamplingParams

if TYPE_CHECKING:
    from triton_vlm.engine.engine import EngineStats

log = logging.getLogger("triton_vlm")


class Engine(Protocol):
    """What the backend uses of :class:`~triton_vlm.engine.LLMEngine` (tests put fakes here)."""

    stats: EngineStats

    def accepts(self, task: str | None) -> bool: ...

    def prepare(self, images: Any, prompt: Any, params: SamplingParams, on_output: Any, *,
                request_id: str | None = None) -> EngineRequest: ...

    def submit(self, request: EngineRequest) -> None: ...

    def abort(self, request_id: str, index: int | None = None) -> None: ...

    def shutdown(self, timeout: float = 30.0) -> bool: ...


#: Builds the engine (called on the service's thread): load the weights, build, warm up, start.
EngineBuilder = Callable[[], Engine]


def build_engine(runtime: VLMRuntime) -> LLMEngine:
    """Load ``runtime``'s weights (once per process), build its engine, capture the CUDA graphs, start its thread."""
    loaded = runtime.ensure_loaded()
    engine = LLMEngine(loaded.family, loaded.model, loaded.processor, runtime.settings.engine)
    engine.runner.warmup()
    return engine.start()


@dataclass(frozen=True)
class _Preload:
    """Build the engine now (``--preload``); ``done`` gets the outcome."""

    done: Future[None]


class _BuildFailed(Exception):
    def __init__(self, error: TritonVLMError) -> None:
        super().__init__(str(error))
        self.error = error


class EngineService(InboxWorker[OpenRequest | _Preload]):
    """Builds and feeds the engine on its own thread. Thread-safe entry points: :meth:`submit`, :meth:`preload`,
    :meth:`stop`, :attr:`engine`."""

    def __init__(self, runtime: VLMRuntime, metrics: BackendMetrics, responses: ResponseLoop, tasks: BatchedTasks,
                 build: EngineBuilder, faults: FaultInjection | None = None, prepare_workers: int = 1) -> None:
        super().__init__("triton-vlm-engine-service")
        self.runtime = runtime
        self.model_name = runtime.settings.model_name
        self.metrics = metrics
        self.responses = responses
        self.tasks = tasks
        self.faults = faults or FaultInjection()
        self._build = build
        self._ids = itertools.count(1)  # next() on a count is atomic: the workers share it
        #: Written once by this thread when the engine is ready; read by any (a reference: no lock needed).
        self._engine: Engine | None = None
        self.prepare_workers = prepare_workers
        self._pool = (ThreadPoolExecutor(prepare_workers, thread_name_prefix="triton-vlm-prepare")
                      if prepare_workers > 1 else None)
        #: The pool's requests not yet done (stop waits for them); added by this thread, removed by the workers.
        self._preparing: set[Future[None]] = set()
        self._preparing_lock = threading.Lock()
        #: Set by :meth:`stop`: a request prepared after it is refused, not handed to a stopping engine.
        self._stopping = threading.Event()

    @property
    def engine(self) -> Engine | None:
        """The engine once built, else None."""
        return self._engine

    def submit(self, request: OpenRequest) -> None:
        """Serve ``request`` (from Triton's execute thread); the service ends it or hands it on."""
        self._inbox.put(request)

    def preload(self) -> None:
        """Build the engine now, on the service's thread, and wait for it; raises the build's error."""
        done: Future[None] = Future()
        self._inbox.put(_Preload(done))
        done.result()

    def stop(self, timeout: float) -> list[str]:
        """Stop taking requests, then shut the engine down, waiting at most ``timeout`` seconds in all (the
        service's thread stops at once unless a build or a request is under way). Names what did not stop."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        stuck = [] if self._join(timeout) else [f"thread {self.name}"]
        if self._pool is not None:
            with self._preparing_lock:
                preparing = list(self._preparing)
            _, unfinished = wait(preparing, timeout=max(deadline - time.monotonic(), 0.1))
            if unfinished:
                stuck.append(f"{len(unfinished)} request(s) in the prepare workers")
            self._pool.shutdown(wait=False)
        engine = self._engine
        if engine is not None and not engine.shutdown(timeout=max(deadline - time.monotonic(), 0.1)):
            stuck.append("the engine thread")
        return stuck

    # -- the service's thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            if isinstance(item, _Preload):
                try:
                    self._ensure_engine()
                except _BuildFailed as failed:
                    item.done.set_exception(failed.error)
                except Exception as exc:  # initialize waits on it: it must hear of any failure
                    item.done.set_exception(exc)
                else:
                    item.done.set_result(None)
            elif self._pool is None or self._engine is None:
                self._serve(item)  # before the engine is built, one request at a time: the first builds it
            else:
                self._hand_to_pool(item)

    def _hand_to_pool(self, request: OpenRequest) -> None:
        assert self._pool is not None
        with self._preparing_lock:
            future = self._pool.submit(self._serve, request)
            self._preparing.add(future)
        future.add_done_callback(self._prepared)

    def _prepared(self, future: Future[None]) -> None:
        with self._preparing_lock:
            self._preparing.discard(future)

    def _serve(self, request: OpenRequest) -> None:
        """The error boundary of one request's work: whatever it raises ends that request with its error."""
        try:
            self._start(request)
        except _BuildFailed as failed:
            request.fail(failed.error, self.metrics)
            self._fail_waiting(failed.error)
        except Exception as exc:
            request.fail(exc, self.metrics)

    def _start(self, request: OpenRequest) -> None:
        """Validate, tokenize and submit ``request`` (or pass it to the batched tasks)."""
        request.started = time.perf_counter()
        triton_request = request.triton_request
        parsed = parse_request(triton_request, self.runtime)
        stream = input_scalar(triton_request, "stream", bool)
        request.parsed = time.perf_counter()
        self.faults.check("parse", parsed.prompt_text)
        engine = self._ensure_engine()
        # The engine runs n choices itself (one prefill); only tasks it does not run go to the batched loop.
        if not engine.accepts(parsed.task):
            self.tasks.submit(request, replace(parsed, is_cancelled=request.is_cancelled))
            return
        request.request_id = f"{triton_request.request_id() or 'req'}-{next(self._ids)}"
        self.faults.check("prepare", parsed.prompt_text)
        prepared = engine.prepare(list(parsed.images), parsed.prompt, parsed.params, self.responses.put,
                                  request_id=request.request_id)
        request.prepared = time.perf_counter()
        if self._stopping.is_set():  # the response loop and the engine stop too: end it here
            raise ModelUnavailableError(f"model {self.model_name!r} is unloading")
        self.responses.open(request, engine, True if stream is None else stream, parsed)
        # The response loop owns the request from here: a failure reaches it as the request's last output.
        try:
            engine.submit(prepared)
        except Exception as exc:
            log.exception("model %s: submitting request %s failed", self.model_name, request.request_id)
            self.responses.put(RequestOutput(request.request_id, (), True, "error", error=exc))

    def _ensure_engine(self) -> Engine:
        if self._engine is None:
            started = time.monotonic()
            try:
                engine = self._build()
            except Exception as exc:
                self.metrics.load_failures.increment(1)
                if isinstance(exc, TritonVLMError):
                    error: TritonVLMError = exc
                    log.error("model %s: %s", self.model_name, exc)
                else:  # e.g. CUDA out of memory while capturing graphs: a later request may find the memory free
                    error = ModelUnavailableError(f"model {self.model_name!r}: engine unavailable: "
                                                  f"{type(exc).__name__}: {exc}")
                    log.error("model %s: building the engine failed", self.model_name, exc_info=exc)
                raise _BuildFailed(error) from exc
            loaded = self.runtime.loaded
            self.metrics.loaded.set(1)
            if loaded is not None:
                self.metrics.load_seconds.set(loaded.load_seconds)
            log.info("model %s: engine ready in %.1fs (requests prepared on %s)", self.model_name,
                     time.monotonic() - started, "the service's thread" if self._pool is None
                     else f"{self.prepare_workers} workers")
            self._engine = engine
        return self._engine

    def _fail_waiting(self, error: TritonVLMError) -> None:
        """Every request that waited for the failed build gets its error (later ones try the build again)."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._inbox.put(None)  # stopping: the loop takes it next
                return
            if isinstance(item, _Preload):
                item.done.set_exception(error)
            else:
                item.fail(error, self.metrics)
