"""The decoupled ``<model>_stream`` Triton model: triton-vlm's engine, with token streaming.

``execute`` only validates, tokenizes and enqueues (it returns at once, so Triton keeps feeding requests and
the engine batches them continuously). The engine thread hands raw token ids to one response thread, which
owns all per-request streaming state: it detokenizes, sends deltas (or one final answer when the request
says ``stream: false``), notices cancelled requests and aborts them in the engine, and ends every request
with exactly one FINAL response.

Tasks the engine does not run (moondream2's captions, detect and point) go to a second thread that runs them
through the family's batched loop on the same loaded model and answers each in one FINAL response.
"""

from __future__ import annotations

import functools
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import triton_python_backend_utils as pb_utils

from triton_vlm.backend.metrics import BackendMetrics, EngineMetrics
from triton_vlm.backend.python_model import answer_response, failure_response
from triton_vlm.backend.requests import (declared_extra_outputs, extra_values, input_scalar, output_response,
                                         parse_request, runtime_from_args)
from triton_vlm.backend.stub_logging import configure_logging, quiet_teardown
from triton_vlm.detokenizer import IncrementalDetokenizer
from triton_vlm.engine import LLMEngine, RequestOutput
from triton_vlm.errors import GenerationError, ModelUnavailableError, TritonVLMError
from triton_vlm.generation import CANCEL_CHECK_S, GenerationOutput
from triton_vlm.runtime import GenerationRequest

log = logging.getLogger("triton_vlm")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass
class _Open:
    request_id: str
    sender: Any
    stream: bool
    received: float = 0.0  # time.perf_counter() when execute got the request
    #: Kept where the model declares extra outputs (kosmos2's entities): they are worked out from the image and
    #: the prompt when the answer is complete.
    request: GenerationRequest | None = None


@dataclass
class _Task:
    """A request for the batched loop (a task the engine does not run)."""

    request: GenerationRequest
    sender: Any
    received: float


#: Requests of such tasks run together in one batched loop, at most this many.
TASK_BATCH = 8
#: How long finalize waits for each of its three threads: 18 s in all, inside Triton's 30 s exit timeout (by
#: then Triton has let every in-flight request finish, so the threads have nothing left to do).
FINALIZE_WAIT_S = 6.0


@dataclass
class _Stream:
    sender: Any
    stream: bool
    token_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0
    sent_tokens: int = 0  # generated tokens when the last delta went out
    received: float = 0.0
    first_token_at: float | None = None
    aborted: bool = False
    request: GenerationRequest | None = None
    #: The streamed text so far, a few tokens decoded per delta (families with ``incremental_text``).
    detokenizer: IncrementalDetokenizer | None = None


class TritonVLMStreamModel:
    """Base for ``triton_models/<m>_stream/1/model.py``; subclasses set :attr:`family`."""

    family: ClassVar[str | None] = None

    def initialize(self, args: dict[str, str]) -> None:
        configure_logging()
        # Three busy threads share this process (execute, engine, responses): hand the GIL over sooner than the
        # default 5 ms so a decode step never waits a whole interval for it.
        sys.setswitchinterval(0.0005)
        self.runtime = runtime_from_args(args, self.family)
        self.model_name = self.runtime.settings.model_name
        self.metrics = BackendMetrics(self.model_name)
        self.engine_metrics = EngineMetrics(self.model_name)
        self._engine: LLMEngine | None = None
        self._engine_lock = threading.Lock()
        self._outbox: queue.SimpleQueue[_Open | RequestOutput | None] = queue.SimpleQueue()
        self._ids = 0
        self._stream_interval = self.runtime.settings.stream_interval
        # Overload: execute() returns at once, so Triton's queue never fills; the bound is here instead. At most
        # max_num_seqs requests run and max_queue_size wait in the engine.
        waiting = self.runtime.settings.max_queue_size
        self._limit = self.runtime.settings.max_num_seqs + waiting if waiting > 0 else None
        self._open = 0
        self._open_lock = threading.Lock()
        self._sender = threading.Thread(target=self._send_loop, name="triton-vlm-responses", daemon=True)
        self._sender.start()
        self.extra_outputs = declared_extra_outputs(args, self.runtime.family.extra_outputs)
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._task_runner = threading.Thread(target=self._task_loop, name="triton-vlm-tasks", daemon=True)
        self._task_runner.start()
        if self.runtime.settings.preload:
            self._ensure_engine()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            received = time.perf_counter()
            sender = request.get_response_sender()
            try:
                with self._open_lock:
                    if self._limit is not None and self._open >= self._limit:
                        raise ModelUnavailableError(
                            f"model {self.model_name!r} is overloaded: {self._open} requests are running or waiting "
                            f"in its engine (limit {self._limit}); retry with backoff")
                parsed = parse_request(request, self.runtime)
                stream = input_scalar(request, "stream", bool)
                engine = self._ensure_engine()
                if not engine.accepts(parsed.task):
                    with self._open_lock:
                        self._open += 1
                    self._tasks.put(_Task(replace(parsed, is_cancelled=getattr(sender, "is_cancelled", None)),
                                          sender, received))
                    continue
                self._ids += 1
                request_id = f"{request.request_id() or 'req'}-{self._ids}"
                engine_request = engine.prepare(parsed.image, parsed.prompt, parsed.params, self._outbox.put,
                                                request_id=request_id)
                # Registered before the engine can answer: the response thread sees _Open first.
                with self._open_lock:
                    self._open += 1
                self._outbox.put(_Open(request_id, sender, True if stream is None else stream, received,
                                       parsed if self.extra_outputs else None))
                engine.submit(engine_request)
            except TritonVLMError as exc:
                sender.send(failure_response(self.metrics, exc), flags=FINAL)
        return None

    def finalize(self) -> None:
        # Triton waits exit_timeout (30 s) for every model to unload at shutdown and exits 1 past it: the waits
        # here stay well within it, and what did not stop in time is named in the log.
        started = time.monotonic()
        stuck = []
        if self._engine is not None and not self._engine.shutdown(timeout=FINALIZE_WAIT_S):
            stuck.append("the engine thread")
        self._outbox.put(None)
        self._tasks.put(None)
        for thread in (self._sender, self._task_runner):  # the sender still ends every open request FINAL
            thread.join(timeout=FINALIZE_WAIT_S)
            if thread.is_alive():
                stuck.append(f"thread {thread.name}")
        if stuck:
            log.warning("model %s: %s still running at unload", self.model_name, ", ".join(stuck))
        log.info("model %s unloaded in %.1fs", self.model_name, time.monotonic() - started)
        quiet_teardown()

    # -- engine -------------------------------------------------------------------------------------------
    def _ensure_engine(self) -> LLMEngine:
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    try:
                        loaded = self.runtime.ensure_loaded()
                    except TritonVLMError:
                        self.metrics.load_failures.increment(1)
                        raise
                    try:
                        engine = LLMEngine(loaded.family, loaded.model, loaded.processor,
                                           self.runtime.settings.engine_config())
                        engine.runner.warmup()
                    except (NotImplementedError, MemoryError) as exc:
                        raise GenerationError(f"model {self.model_name!r}: engine unavailable: {exc}") from exc
                    self.metrics.loaded.set(1)
                    self.metrics.load_seconds.set(loaded.load_seconds)
                    self._engine = engine.start()
        return self._engine

    # -- the batched loop, for tasks the engine does not run ------------------------------------------------
    def _task_loop(self) -> None:
        while True:
            first = self._tasks.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < TASK_BATCH:
                try:
                    item = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._tasks.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            try:
                results: list[GenerationOutput | TritonVLMError] = self.runtime.generate([t.request for t in batch])
            except Exception as exc:  # never lose the thread: every request of the batch still gets its answer
                log.exception("batched generation failed")
                results = [exc if isinstance(exc, TritonVLMError) else GenerationError(f"{type(exc).__name__}: {exc}")
                           ] * len(batch)
            for task, result in zip(batch, results):
                self._answer_task(task, result)

    def _answer_task(self, task: _Task, result: GenerationOutput | TritonVLMError) -> None:
        """One FINAL response: the answer, or the request's own error."""
        try:
            response = (failure_response(self.metrics, result) if isinstance(result, TritonVLMError)
                        else answer_response(self.metrics, self.extra_outputs, result, task.received))
            task.sender.send(response, flags=FINAL)
        except Exception:  # a client that went away
            log.exception("sending a response failed")
            _send_final(task.sender)
        finally:
            with self._open_lock:
                self._open -= 1

    # -- the response thread ------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        streams: dict[str, _Stream] = {}
        next_sample = next_cancel_check = 0.0
        busy = False  # requests were open since the last sample
        while True:
            # Take everything pending, then send at most one response per request: when the engine outpaces
            # the IPC to Triton, deltas merge instead of queueing up (and the GIL stays with the engine).
            try:
                batch = [self._outbox.get(timeout=0.05)]
            except queue.Empty:
                batch = []
            while True:
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            pending: dict[str, RequestOutput] = {}
            for message in batch:
                if message is None:
                    self._flush(streams, pending)
                    for state in streams.values():  # shutting down: every open request still ends FINAL
                        _send_final(state.sender)
                    return
                if isinstance(message, _Open):
                    streams[message.request_id] = _Stream(message.sender, message.stream, received=message.received,
                                                          request=message.request)
                elif message.request_id in streams:
                    state = streams[message.request_id]
                    if message.new_token_ids and state.first_token_at is None:
                        state.first_token_at = time.perf_counter()
                    state.token_ids.extend(message.new_token_ids)
                    pending[message.request_id] = message  # the latest carries counts and finish state
            busy = busy or bool(streams) or bool(pending)
            self._flush(streams, pending)
            if time.monotonic() >= next_cancel_check:
                # Each question is an IPC round trip per open request: not at every step (the loop's pace).
                next_cancel_check = time.monotonic() + CANCEL_CHECK_S
                self._abort_cancelled(streams)
            if busy and time.monotonic() >= next_sample:
                next_sample, busy = time.monotonic() + 0.25, False
                self._sample_engine()

    def _flush(self, streams: dict[str, _Stream], pending: dict[str, RequestOutput]) -> None:
        for request_id, out in pending.items():
            state = streams[request_id]
            try:
                self._deliver(state, out)
            except Exception:  # a client that went away must not stop the thread
                log.exception("sending a response failed")
                _send_final(state.sender)
                if not out.finished and self._engine is not None:
                    self._engine.abort(request_id)
                out = RequestOutput(request_id, (), True, "abort")
            if out.finished:
                del streams[request_id]
                with self._open_lock:
                    self._open -= 1

    def _deliver(self, state: _Stream, out: RequestOutput) -> None:
        """Send what ``out`` (the latest output, tokens already merged into ``state``) calls for."""
        if out.finished and out.error is not None:
            error = out.error if isinstance(out.error, TritonVLMError) else GenerationError(str(out.error))
            state.sender.send(failure_response(self.metrics, error), flags=FINAL)
            return
        if out.finish_reason == "abort":
            state.sender.send(flags=FINAL)
            return
        if not (out.finished or state.stream):
            return  # a whole-answer request: nothing to send until the end
        if not out.finished and state.sent_chars and out.generated_tokens - state.sent_tokens < self._stream_interval:
            return  # the next delta waits for stream_interval tokens (the first went out at once)
        processor = self.runtime.loaded.processor  # type: ignore[union-attr]
        extras: dict[str, str] = {}
        if out.finished and self.extra_outputs and state.request is not None:
            # The whole answer: its text and the extra outputs worked out from it (kosmos2's entities).
            text, found = self.runtime.family.decode_output(processor, state.token_ids, state.request.image,
                                                            state.request.prompt)
            extras = extra_values(self.extra_outputs, found)
        elif not out.finished and self.runtime.family.incremental_text:
            if state.detokenizer is None:
                state.detokenizer = IncrementalDetokenizer(functools.partial(self.runtime.family.detokenize,
                                                                             processor))
            text = state.detokenizer.update(state.token_ids).strip()
        else:  # the whole answer once, at the end (or a family whose text is no plain decode)
            text = self.runtime.family.decode_text(processor, state.token_ids)
        if out.finished:
            finished = time.perf_counter()
            self.metrics.observe_request(state.received, state.first_token_at, finished, out.generated_tokens,
                                         out.prompt_tokens)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("model %s: request %s: %d prompt + %d generated tokens, %s, first token after %.3fs, "
                          "%.3fs in all", self.model_name, out.request_id, out.prompt_tokens, out.generated_tokens,
                          out.finish_reason, (state.first_token_at or finished) - state.received,
                          finished - state.received)
            piece = text[state.sent_chars:] if state.stream else text
            state.sender.send(output_response(piece, out.generated_tokens, out.prompt_tokens, out.finish_reason,
                                              extras), flags=FINAL)
        elif not text.endswith("\ufffd") and len(text) > state.sent_chars:
            # Hold back a trailing replacement character: the next token may complete that UTF-8 sequence.
            piece, state.sent_chars, state.sent_tokens = text[state.sent_chars:], len(text), out.generated_tokens
            state.sender.send(output_response(piece, out.generated_tokens, out.prompt_tokens, None))

    def _sample_engine(self) -> None:
        """Engine metrics, sampled at most every 0.25 s while requests are open and once after (one call per step
        would cost an IPC round trip per token): sequences running now as the batch size, and the counters."""
        if self._engine is None:
            return
        running = len(self._engine.scheduler.running)
        if running:
            self.metrics.batch_size.set(running)
            self.metrics.batch_sizes.observe(running)
        self.engine_metrics.update(self._engine.stats)

    def _abort_cancelled(self, streams: dict[str, _Stream]) -> None:
        if self._engine is None:
            return
        for request_id, state in list(streams.items()):
            if state.aborted:
                continue
            is_cancelled = getattr(state.sender, "is_cancelled", None)
            if is_cancelled is not None and is_cancelled():
                log.info("request %s: cancelled by its client; aborting it in the engine", request_id)
                state.aborted = True
                self._engine.abort(request_id)


def _send_final(sender: Any) -> None:
    """End a request whatever state its client is in: Triton keeps a model loaded until every request ended."""
    try:
        sender.send(flags=FINAL)
    except Exception:
        log.debug("final flag not delivered", exc_info=True)
