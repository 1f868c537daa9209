"""The response loop of a ``<model>_stream`` model: one thread ("triton-vlm-responses") that sends every response of
the requests the engine runs.

The engine thread hands it raw token ids (:meth:`ResponseLoop.put`, the engine requests' ``on_output``); the engine
service announces each request before submitting it (:meth:`ResponseLoop.open`), so the loop knows a request before
its first output. The loop owns all per-request streaming state (:class:`_Stream`, with a :class:`_Choice` per choice
of a request for ``n``: outputs carry their choice's index): it detokenizes, sends deltas (each with its choice's
``index``; or one whole answer when the request says ``stream: false``, its choices 1 to n-1 in ``choices``), ends a
choice at its stop string (aborting that choice alone in the engine), notices cancelled requests and aborts them
in the engine, and ends every request with exactly one FINAL response: with its last choice's end, or with the
first error or abort of any choice. Engine metrics come from the engine's published
:class:`~triton_vlm.engine.engine.EngineStats`; the loop never reads the scheduler, which belongs to the engine
thread.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from triton_vlm._protocol.wire import Choice
from triton_vlm._protocol.wire import TokenLogprob as WireLogprob
from triton_vlm.backend.metrics import BackendMetrics, EngineMetrics
from triton_vlm.backend.requests import extra_values, output_response, wire_logprobs
from triton_vlm.backend.stream_requests import OpenRequest
from triton_vlm.backend.worker import InboxWorker
from triton_vlm.detokenizer import IncrementalDetokenizer
from triton_vlm.engine import RequestOutput
from triton_vlm.models.generation import CANCEL_CHECK_S
from triton_vlm.observability.phases import first_token_phases
from triton_vlm.runtime import GenerationRequest, VLMRuntime
from triton_vlm.sampling import StopMatcher, TokenLogprob, cut_at_stop, safe_length

if TYPE_CHECKING:
    from triton_vlm.engine.engine import EngineStats

log = logging.getLogger("triton_vlm")

#: How often engine metrics are sampled while requests are open (each update is an IPC call per metric).
SAMPLE_S = 0.25


class EngineHandle(Protocol):
    """What the response loop uses of the engine: both are safe to use from its thread."""

    #: Counters and the running batch size, written by the engine thread (read for metrics only).
    stats: EngineStats

    def abort(self, request_id: str, index: int | None = None) -> None: ...


@dataclass(frozen=True)
class _Opened:
    """A request the engine service is about to submit (it reaches the loop before any of its outputs)."""

    request: OpenRequest
    engine: EngineHandle
    stream: bool
    #: Kept where the model declares extra outputs (kosmos2's entities): they are worked out from the image and
    #: the prompt when the answer is complete.
    generation: GenerationRequest | None
    #: The request's stop strings (the answer ends right before the first).
    stop: tuple[str, ...] = ()
    #: Its choices (the engine runs one sequence per choice; their outputs carry the index).
    n: int = 1


@dataclass(eq=False)
class _Choice:
    """One choice of an open request (a request for ``n`` choices has n), as the response thread tracks it."""

    #: The request it belongs to.
    state: _Stream
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0
    sent_tokens: int = 0  # generated tokens when the last delta went out
    #: The streamed text so far, a few tokens decoded per delta (families with ``incremental_text``).
    detokenizer: IncrementalDetokenizer | None = None
    #: Where the text reaches a stop string, a few tokens decoded per output (made at the first, where ``stop``).
    stops: StopMatcher | None = None
    #: Each generated token's logprob where asked, and how many went out with earlier deltas.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_logprobs: int = 0
    #: Once the choice ended: its last output; with a whole answer (``stream`` false) also what it answers.
    ended: RequestOutput | None = None
    answer: Choice | None = None
    extras: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class _Stream:
    """One open engine request, as the response thread (its only user) tracks it."""

    request: OpenRequest
    stream: bool
    first_token_at: float | None = None
    aborted: bool = False
    generation: GenerationRequest | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    #: One per choice, by index; made with the request.
    choices: list[_Choice] = field(default_factory=list)
    #: Choices that have not ended yet: the request ends (FINAL) with the last.
    running: int = 0
    #: The engine's stamps of the first token (``RequestOutput.first_token_times``), and when the first response
    #: with text left (streamed requests): the last phases of the time to first token.
    engine_times: tuple[float, float] | None = None
    first_sent_at: float = 0.0

    def __post_init__(self) -> None:
        self.choices = [_Choice(self, i) for i in range(self.n)]
        self.running = self.n

    def note_sent(self) -> None:
        """A streamed piece leaves now: the first one's time ends the request's time to first token."""
        self.first_sent_at = self.first_sent_at or time.perf_counter()


class ResponseLoop(InboxWorker[_Opened | RequestOutput]):
    """Sends the engine requests' responses from its own thread. Thread-safe entry points: :meth:`open`,
    :meth:`put`, :meth:`stop`."""

    def __init__(self, runtime: VLMRuntime, metrics: BackendMetrics, engine_metrics: EngineMetrics,
                 extra_outputs: dict[str, str]) -> None:
        super().__init__("triton-vlm-responses")
        self.runtime = runtime
        self.metrics = metrics
        self.engine_metrics = engine_metrics
        self.extra_outputs = extra_outputs
        self.stream_interval = runtime.settings.engine.stream_interval
        # Owned by the response thread: the engine of the requests it serves (from their _Opened message).
        self._engine: EngineHandle | None = None

    def open(self, request: OpenRequest, engine: EngineHandle, stream: bool,
             generation: GenerationRequest | None) -> None:
        """Announce ``request`` (before it is submitted to ``engine``); the loop answers it from now on."""
        self._inbox.put(_Opened(request, engine, stream, generation if self.extra_outputs else None,
                                () if generation is None else generation.params.stop,
                                1 if generation is None else generation.params.n))

    def put(self, output: RequestOutput) -> None:
        """An engine output (the engine requests' ``on_output``; quick, from the engine thread)."""
        self._inbox.put(output)

    def stop(self, timeout: float) -> bool:
        """Send what is pending, end every open request FINAL and stop; whether the thread stopped in ``timeout``."""
        return self._join(timeout)

    # -- the loop -------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        streams: dict[str, _Stream] = {}
        next_sample = next_cancel_check = 0.0
        busy = False  # requests were open since the last sample
        while True:
            # Take everything pending, then send at most one response per choice: when the engine outpaces
            # the IPC to Triton, deltas merge instead of queueing up (and the GIL stays with the engine).
            try:
                batch = [self._inbox.get(timeout=0.05)]
            except queue.Empty:
                batch = []
            while True:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            pending: dict[_Choice, RequestOutput] = {}
            for message in batch:
                if message is None:
                    self._flush(streams, pending)
                    for state in streams.values():  # shutting down: every open request still ends FINAL
                        state.request.finish()
                    return
                if isinstance(message, _Opened):
                    self._engine = message.engine
                    streams[message.request.request_id] = _Stream(message.request, message.stream,
                                                                  generation=message.generation, stop=message.stop,
                                                                  n=message.n)
                elif message.request_id in streams:
                    state = streams[message.request_id]
                    if message.new_token_ids and state.first_token_at is None:
                        state.first_token_at = time.perf_counter()
                    if message.first_token_times is not None and state.engine_times is None:
                        state.engine_times = message.first_token_times
                    choice = state.choices[message.index]
                    choice.token_ids.extend(message.new_token_ids)
                    choice.logprobs.extend(message.logprobs)
                    pending[choice] = message  # the latest carries counts and finish state
            busy = busy or bool(streams) or bool(pending)
            self._flush(streams, pending)
            if time.monotonic() >= next_cancel_check:
                # Each question is an IPC round trip per open request: not at every step (the loop's pace).
                next_cancel_check = time.monotonic() + CANCEL_CHECK_S
                self._abort_cancelled(streams)
            if busy and time.monotonic() >= next_sample:
                next_sample, busy = time.monotonic() + SAMPLE_S, False
                self._sample_engine()

    def _flush(self, streams: dict[str, _Stream], pending: dict[_Choice, RequestOutput]) -> None:
        for choice, out in pending.items():
            state = choice.state
            request_ended = state.request.ended  # a local: the check after _deliver reads the attribute again
            if request_ended or choice.ended is not None:
                continue  # the request ended (another choice failed), or this choice did (a stop string)
            try:
                self._deliver(choice, out)
            except Exception as exc:  # a client that went away, or a failure building the answer: this request
                state.request.fail(exc, self.metrics)  # ends with its error, the loop goes on with the others
            if state.request.ended:
                del streams[state.request.request_id]
                if state.running and not state.aborted and self._engine is not None:
                    self._engine.abort(state.request.request_id)  # its choices still running end too

    def _deliver(self, choice: _Choice, out: RequestOutput) -> RequestOutput:
        """Send what ``out`` (the choice's latest output, tokens already merged into ``choice``) calls for; returns
        it, as the choice's end where a stop string ended it. The request ends (FINAL) with its last choice, with
        an error in any, or with an abort (its client cancelled it, or the engine shut down)."""
        state = choice.state
        if out.finished and (out.error is not None or out.finish_reason == "abort"):
            choice.ended = out
            state.running -= 1
            if out.error is not None:
                state.request.fail(out.error, self.metrics)
            else:
                state.request.finish()
            return out
        if state.stop and not out.finished:
            out = self._check_stop(choice, out)
        if not (out.finished or state.stream):
            return out  # a whole-answer request: nothing to send until the end
        if not out.finished and choice.sent_chars and out.generated_tokens - choice.sent_tokens < self.stream_interval:
            return out  # the next delta waits for stream_interval tokens (the first went out at once)
        family = self.runtime.family
        processor = self.runtime.ensure_loaded().processor  # loaded before the engine was built: no lock taken
        extras: dict[str, str] = {}
        if state.stop:  # a stop string may span tokens, and its text is never sent
            if out.finished:  # the whole answer once, up to its first stop string
                text = cut_at_stop(family.decode_text(processor, choice.token_ids), state.stop)
            else:  # what _check_stop's matcher read, less the end that could start a stop string
                assert choice.stops is not None  # made by _check_stop for this very output
                text = choice.stops.text
                text = text[:safe_length(text, state.stop)]
        elif out.finished and self.extra_outputs and state.generation is not None:
            # The whole answer: its text and the extra outputs worked out from it (kosmos2's entities).
            text, found = family.decode_output(processor, choice.token_ids, state.generation.image,
                                               state.generation.prompt_text)
            extras = extra_values(self.extra_outputs, found)
        elif not out.finished and family.incremental_text:
            if choice.detokenizer is None:
                choice.detokenizer = family.detokenizer(processor)
            text = choice.detokenizer.update(choice.token_ids).strip()
        else:  # the whole answer once, at the end (or a family whose text is no plain decode)
            text = family.decode_text(processor, choice.token_ids)
        if out.finished:
            choice.ended = out
            state.running -= 1
            if state.stream:
                response = output_response(text[choice.sent_chars:], out.generated_tokens, out.prompt_tokens,
                                           out.finish_reason, extras, logprobs=self._new_logprobs(choice),
                                           index=choice.index, cached_tokens=out.cached_tokens)
            else:
                choice.answer = Choice(choice.index, text, out.finish_reason or "", out.generated_tokens,
                                       self._new_logprobs(choice))
                choice.extras = extras
                response = self._whole_answer(state) if not state.running else None
            if state.stream:
                state.note_sent()
            if not state.running:
                self._observe(state)
                state.request.finish(response)
            elif response is not None:
                state.request.send(response)  # a streamed choice's last piece; the others go on
        elif not text.endswith("\ufffd") and len(text) > choice.sent_chars:
            # Hold back a trailing replacement character: the next token may complete that UTF-8 sequence.
            piece, choice.sent_chars, choice.sent_tokens = text[choice.sent_chars:], len(text), out.generated_tokens
            state.note_sent()
            state.request.send(output_response(piece, out.generated_tokens, out.prompt_tokens, None,
                                               logprobs=self._new_logprobs(choice), index=choice.index))
        return out

    @staticmethod
    def _whole_answer(state: _Stream) -> Any:
        """A whole-answer request's one response: choice 0 in the common outputs, the others in ``choices``."""
        first = state.choices[0]
        assert first.answer is not None and first.ended is not None  # every choice has ended
        others = [choice.answer for choice in state.choices[1:] if choice.answer is not None]
        return output_response(first.answer.text, first.answer.generated_tokens, first.ended.prompt_tokens,
                               first.answer.finish_reason, first.extras, logprobs=first.answer.logprobs,
                               choices=others, cached_tokens=first.ended.cached_tokens)

    def _check_stop(self, choice: _Choice, out: RequestOutput) -> RequestOutput:
        """``out`` as the choice's end (finish reason "stop", its decoding aborted in the engine: that choice only)
        once its text holds a stop string; else as it is."""
        if choice.stops is None:
            choice.stops = self.runtime.family.stop_matcher(self.runtime.ensure_loaded().processor,
                                                            choice.state.stop)
        if choice.stops.update(choice.token_ids) is None:
            return out
        if self._engine is not None:
            # Its "abort" output finds the choice (or the whole request) answered, and is dropped.
            self._engine.abort(out.request_id, out.index)
        return replace(out, finished=True, finish_reason="stop")

    def _new_logprobs(self, choice: _Choice) -> tuple[WireLogprob, ...]:
        """The ``token_logprobs`` entries of the choice's tokens since its last delta."""
        entries, choice.sent_logprobs = choice.logprobs[choice.sent_logprobs:], len(choice.logprobs)
        return wire_logprobs(entries, self.runtime.token_text)

    def _observe(self, state: _Stream) -> None:
        """A finished request's metrics (its choices' generated tokens together, the phases of its time to first
        token), and its debug line."""
        finished = time.perf_counter()
        request = state.request
        ends = [choice.ended for choice in state.choices if choice.ended is not None]
        generated = sum(out.generated_tokens for out in ends)
        prompt_tokens = ends[0].prompt_tokens if ends else 0
        admitted, produced = state.engine_times or (0.0, 0.0)
        phases = first_token_phases(request.received, request.started, request.parsed, request.prepared, admitted,
                                    produced, state.first_sent_at)
        self.metrics.observe_request(request.received, state.first_token_at, finished, generated, prompt_tokens,
                                     phases=phases)
        if log.isEnabledFor(logging.DEBUG):
            split = " (" + ", ".join(f"{k} {v:.4f}" for k, v in phases.items()) + ")" if phases else ""
            log.debug("model %s: request %s: %d prompt + %d generated tokens, %s, first token after %.3fs%s, "
                      "%.3fs in all", self.runtime.settings.model_name, request.request_id, prompt_tokens,
                      generated, "/".join(out.finish_reason or "" for out in ends),
                      (state.first_token_at or finished) - request.received, split, finished - request.received)

    def _sample_engine(self) -> None:
        """Engine metrics, sampled at most every SAMPLE_S while requests are open and once after (one update per
        step would cost an IPC round trip per token): the sequences the engine ran at its latest step as the batch
        size, and the counters."""
        if self._engine is None:
            return
        stats = self._engine.stats
        running = stats.running  # read once: the engine thread replaces it at every step
        try:
            if running:
                self.metrics.batch_size.set(running)
                self.metrics.batch_sizes.observe(running)
            self.engine_metrics.update(stats)
        except Exception:  # metrics are reports: a failed update never stops the responses
            log.exception("updating the engine metrics failed")

    def _abort_cancelled(self, streams: dict[str, _Stream]) -> None:
        if self._engine is None:
            return
        for request_id, state in list(streams.items()):
            if state.aborted:
                continue
            is_cancelled = state.request.is_cancelled
            try:
                cancelled = is_cancelled is not None and is_cancelled()
            except Exception:  # asking is an IPC call; a failed question is asked again at the next check
                log.debug("request %s: could not ask whether it was cancelled", request_id, exc_info=True)
                continue
            if cancelled:
                log.info("request %s: cancelled by its client; aborting it in the engine", request_id)
                state.aborted = True
                self._engine.abort(request_id)
