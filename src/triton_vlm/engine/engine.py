"""LLMEngine: the continuous-batching loop, on its own thread.

Callers (the Triton backend's execute, the CLI, benchmarks) only enqueue: ``submit`` and ``abort`` put
messages in a thread-safe inbox. The engine thread owns the scheduler, the KV cache and every sequence, and
runs ``step()`` = schedule -> launch -> read back the previous step, draining the inbox between steps.

A step's tokens are read back while the next step already runs on the device (its inputs come from the
device, not from the host), so responses, scheduling and Python overhead hide behind GPU time. The price: a
sequence that stops on EOS gets one step more than it needed, whose token is dropped.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from triton_vlm.config import EngineConfig
from triton_vlm.engine.adapter import EngineFamily, ProcessedImage, positioned
from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.prefix_cache import PrefixCache, prompt_keys
from triton_vlm.engine.quantization import check_fp8_support, kv_cache_dtype
from triton_vlm.engine.request import EngineRequest, RequestOutput, Sequence, SequenceStatus
from triton_vlm.engine.runner import ModelRunner
from triton_vlm.engine.scheduler import Scheduler, SchedulerOutput
from triton_vlm.engine.transfer import device_longs
from triton_vlm.errors import GenerationError, InvalidInputError, TritonVLMError
from triton_vlm.images import DIGEST_KEY, image_list
from triton_vlm.memo import BoundedMemo
from triton_vlm.sampling import (
    SamplingParams,
    StepLogprobs,
    TokenLogprob,
    choose_tokens,
    make_generator,
    penalize,
    step_logprobs,
    token_mask,
)
from triton_vlm.structured import GrammarState, mask_logits

log = logging.getLogger("triton_vlm")


@dataclass
class EngineStats:
    """What the engine publishes for metrics: written by the engine thread only; other threads (the backend's
    response loop) read it without a lock, for reports, never for control."""

    #: Sequences the scheduler runs (prefilling or decoding) after the latest step: the batch size now.
    running: int = 0
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    #: Admitted requests whose prompt started with a cached prefix (hits) or that had one to look up and found
    #: none (misses; prompts shorter than a block are neither), and the prompt positions the cache spared.
    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_cached_tokens: int = 0
    #: Prefill steps whose one short text chunk ran as decode rows of its slot (``prefill_rows_max``).
    row_prefills: int = 0
    #: Host time by phase; "mixed" is steps that prefill and decode in one forward; "wait" is time spent waiting
    #: for the device to finish a step.
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("schedule", "vision", "prefill", "decode", "mixed", "wait", "update"), 0.0))


@dataclass(frozen=True)
class _Abort:
    request_id: str
    #: One choice of the request (None: all of them).
    index: int | None = None


@dataclass(frozen=True)
class _InFlight:
    """A launched step: each of ``rows`` gets one token, at its slot (as launched) of ``tokens()``."""

    rows: list[Sequence]
    slots: list[int]
    tokens: Callable[[], list[int]]
    #: The logprobs of the rows that asked, on the device: ``(their sequences, the step's logprobs)``.
    logprobs: list[tuple[list[Sequence], StepLogprobs]] = field(default_factory=list)


class LLMEngine:
    """Serves one loaded model. Thread-safe entry points: :meth:`submit`, :meth:`abort`, :meth:`shutdown`."""

    def __init__(self, family: EngineFamily, model: Any, processor: Any, config: EngineConfig | None = None) -> None:
        adapter = family.engine_adapter()
        if adapter is None:
            raise GenerationError(f"the engine does not support the {family.name} family yet")
        self.family = family
        self.adapter = adapter
        self.model = model
        self.processor = processor
        self.config = config or EngineConfig()
        self.decoder = adapter.build_decoder(model)
        device = next(model.parameters()).device
        if "fp8" in (self.config.quantization, self.config.kv_cache_dtype):
            check_fp8_support(device)
        if self.config.quantization != "none":
            quantize = getattr(self.decoder, "quantize", None)
            if quantize is None:
                raise GenerationError(f"quantization={self.config.quantization}: the engine's {family.name} decoder "
                                      "keeps its weights in the model's dtype (only Llama-family ones quantize)")
            quantize(self.config.quantization)
        max_len = min(self.config.max_model_len, adapter.context_length(model))
        self.max_model_len = max_len
        self.cache = SlotKVCache.sized_for(
            self.decoder.num_layers, self.decoder.num_kv_heads, self.decoder.head_dim, max_len,
            self.config.max_num_seqs, kv_cache_dtype(self.config.kv_cache_dtype, model.dtype), device,
            self.config.kv_cache_memory_fraction)
        self.prefix_cache = (PrefixCache(self.cache.num_slots, self.config.prefix_block_size)
                             if self.config.prefix_caching else None)
        self.scheduler = Scheduler(self.config, self.cache, self.prefix_cache)
        self.runner = ModelRunner(adapter, model, self.decoder, self.cache, self.config)
        #: Read a step's tokens back after launching the next one: on a GPU the host prepares step k+1 while the
        #: device runs step k. On the CPU a launch is the computation itself, so waiting for the next step would
        #: only hold every token back by one step (a first token too): there each step is read back at once.
        self.overlap_steps = self.runner.device.type == "cuda"
        self.stop_token_ids = frozenset(family.stop_token_ids(model, processor))
        self.min_first_chunk = adapter.min_first_chunk(model)
        self._inbox: queue.SimpleQueue[EngineRequest | _Abort | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._generators: dict[Sequence, torch.Generator | None] = {}
        #: Sequences with penalties: how often each token was generated [vocab] and the prompt's tokens [vocab], on
        #: the device (counted when a token is chosen, so they hold the tokens not yet read back too).
        self._counts: dict[Sequence, tuple[torch.Tensor, torch.Tensor]] = {}
        self._step_logprobs: list[tuple[list[Sequence], StepLogprobs]] = []
        #: Sequences with a ``response_format``: where each stands in its grammar (tokens read back so far).
        self._grammars: dict[Sequence, GrammarState] = {}
        self._in_flight: _InFlight | None = None
        self.stats = EngineStats()
        #: One-image requests' processed images by file digest (``_prepare_inputs``); thread-safe.
        self._processed: BoundedMemo[bytes, ProcessedImage] = BoundedMemo(self.config.image_cache_mb << 20)

    # -- thread-safe API ----------------------------------------------------------------------------------
    def accepts(self, task: str | None) -> bool:
        """Whether the engine runs requests of ``task`` (normalized; None: the family's default). The others
        (moondream2's captions and region skills) belong to the batched loop."""
        return self.adapter.accepts(task)

    def prepare(self, images: Any, prompt: Any, params: SamplingParams, on_output: Any, *,
                request_id: str | None = None, ignore_eos: bool | None = None) -> EngineRequest:
        """Tokenize a request (on the caller's thread) and check that it fits the context. ``images``: one image,
        or a list (none: a text-only turn); ``prompt``: a prompt string or a ``triton_vlm.chat.Chat``, rendered by
        the family (``render_input``)."""
        text = self.family.render_input(self.processor, prompt)
        pictures = image_list(images)
        prompt_ids, mm_inputs = self._prepare_inputs(pictures, text)
        rope = self.adapter.rope_positions(self.model, prompt_ids, mm_inputs) if positioned(self.decoder) else None
        positions, rope_delta = rope if rope is not None else (None, 0)
        fmt = params.response_format
        # Compiled here, on the caller's thread (a bad schema is this request's INVALID_ARG); cached by schema.
        grammar = None if fmt is None else self.family.grammars(self.processor, self.stop_token_ids).compile(fmt)
        if grammar is not None:
            ignore_eos = False  # a grammar ends on EOS, where it accepts
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidInputError(
                f"prompt of {len(prompt_ids)} tokens (image included) + max_tokens {params.max_tokens} exceeds "
                f"the engine's context of {self.max_model_len} tokens", param="prompt")
        block = self.config.prefix_block_size
        keys = (prompt_keys(prompt_ids, mm_inputs.get("image_rows", ()), pictures, block)
                if self.prefix_cache is not None and len(prompt_ids) > block else None)
        return EngineRequest(request_id=request_id or f"req-{next(self._ids)}", prompt_ids=prompt_ids,
                             params=params, on_output=on_output, mm_inputs=mm_inputs,
                             stop_token_ids=frozenset() if (params.ignore_eos if ignore_eos is None else ignore_eos)
                             else self.stop_token_ids, min_first_chunk=self.min_first_chunk,
                             prompt_positions=positions, rope_delta=rope_delta, grammar=grammar,
                             prefix_keys=keys)

    def _prepare_inputs(self, pictures: list[Any], text: Any) -> tuple[list[int], dict[str, Any]]:
        """The adapter's :meth:`~EngineAdapter.prepare`; for a one-image request whose image (by the digest of its
        file, :class:`~triton_vlm.images.DecodedImages`) went through the processor lately, its processed pixels
        again, only the text tokenized (a chat's later turns)."""
        digest = pictures[0].info.get(DIGEST_KEY) if len(pictures) == 1 else None
        if digest:
            seen = self._processed.get(digest)
            reused = None if seen is None else self.adapter.reuse_image(self.processor, seen, text)
            if reused is not None:
                return reused
        prompt_ids, mm_inputs = self.adapter.prepare(self.family, self.processor, pictures, text)
        if digest and self._processed.capacity:
            processed = self.adapter.processed_image(mm_inputs)
            if processed is not None:
                self._processed.put(digest, processed, processed.size)
        return prompt_ids, mm_inputs

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put(request)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """End ``request_id``'s choice ``index`` (None: every choice), each with an "abort" output; a request or
        choice that already ended is left as it is."""
        self._inbox.put(_Abort(request_id, index))

    def start(self) -> LLMEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="triton-vlm-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Abort what is queued or running and stop the thread (waiting at most ``timeout`` seconds). Returns
        whether it stopped in that time."""
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._inbox.put(None)
        thread.join(timeout=timeout)
        return not thread.is_alive()

    # -- the loop -----------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def _loop(self) -> None:
        while True:
            block = not self.has_work()
            if not self._drain(block=block):
                return
            self.step()
            self.stats.running = len(self.scheduler.running)

    def _drain(self, block: bool) -> bool:
        """Move inbox messages into the scheduler; False once shutdown was asked for."""
        while True:
            try:
                message = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if message is None:
                for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                    self._finish(seq, "abort")
                return False
            if isinstance(message, _Abort):
                aborted = [seq for seq in self.scheduler.find(message.request_id)
                           if message.index is None or seq.request.index == message.index]
                for seq in aborted:
                    self._finish(seq, "abort")
                if aborted:
                    log.info("engine: request %s%s aborted after %d tokens; its KV slots are free again "
                             "(%d of %d slots free, %d waiting)", message.request_id,
                             "" if message.index is None else f" (choice {message.index})",
                             sum(len(seq.output_ids) for seq in aborted), self.cache.free_slots,
                             self.cache.num_slots, len(self.scheduler.waiting))
            else:
                self._add(message)

    def _add(self, request: EngineRequest) -> None:
        """Queue ``request``'s sequences: one per choice, the later ones after the first's prefill."""
        n = request.params.n
        choices = [request] if n == 1 else [replace(request, params=request.params.choice(i), index=i)
                                            for i in range(n)]
        first: Sequence | None = None
        for choice in choices:
            seq = Sequence(choice, max_generated=min(choice.params.max_tokens,
                                                     self.max_model_len - len(choice.prompt_ids)), after=first)
            first = first or seq
            self._generators[seq] = make_generator(choice.params, self.runner.device)
            if choice.grammar is not None:
                self._grammars[seq] = GrammarState(choice.grammar)
            self.scheduler.add(seq)

    def step(self) -> bool:
        """One scheduling round: launch the planned work, then hand out the previous step's tokens (without
        ``overlap_steps``: this step's). Returns False when there was nothing to do."""
        if self._in_flight is not None and self._grammars:
            # A grammar's next mask needs the previous token: read the step back before launching the next one
            # (this gives up the overlap of read-back and launch only while constrained sequences run).
            read_now, self._in_flight = self._in_flight, None
            self._complete(read_now)
        plan = self.scheduler.schedule()
        if plan.empty and self._in_flight is None:
            return False
        launched = None
        if not plan.empty:
            self.stats.steps += 1
            launched = self._launch(plan)
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            self._complete(previous)
        if not self.overlap_steps and self._in_flight is not None:
            read_now, self._in_flight = self._in_flight, None
            self._complete(read_now)
        return True

    def _launch(self, plan: SchedulerOutput) -> _InFlight | None:
        """Enqueue ``plan`` on the device; every sequence that gets a token is counted as having it."""
        clock = time.perf_counter()
        seconds = self.stats.seconds

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[phase] += now - clock
            clock = now

        lap("schedule")
        finished_prefill = [c.seq for c in plan.prefill if c.completes_prompt]
        # Rows whose token is more than the graph's argmax (sampled, penalized, asking for logprobs, or masked by a
        # response_format grammar).
        sampled = [s for s in plan.decode if s.request.params.needs_logits or s in self._grammars]
        prefill_logits = decode_logits = None
        try:
            for source, target, length in plan.copies:  # before this step's kernels may write to either slot
                self.cache.copy_prefix(source, target, length)
            if plan.admitted:
                for seq in plan.admitted:
                    seq.admitted_at = clock
                self._count_cached(plan.admitted)
                self.runner.build_prompt_embeds(plan.admitted)
                lap("vision")
            as_rows = self.runner.takes_as_rows(plan.prefill)  # a short text chunk: graphed rows, then the decodes
            mixed = bool(plan.prefill and plan.decode and self.runner.mixes) and not as_rows
            if mixed:
                prefill_logits, decode_logits = self.runner.prefill_and_decode(plan.prefill, plan.decode)
                lap("mixed")
            elif plan.prefill:
                prefill_logits = (self.runner.prefill_rows(plan.prefill[0]) if as_rows
                                  else self.runner.prefill(plan.prefill))
                self.stats.row_prefills += as_rows
                lap("prefill")
            if plan.decode and not mixed:
                decode_logits = self.runner.decode(plan.decode, need_logits=bool(sampled))
                lap("decode")
            if finished_prefill:  # their first token
                assert prefill_logits is not None
                keep = [i for i, c in enumerate(plan.prefill) if c.completes_prompt]
                self._choose(finished_prefill, prefill_logits[device_longs(keep, prefill_logits.device)])
            if sampled:  # greedy rows already have their token from the step; sampled (or masked) ones overwrite
                assert decode_logits is not None
                self._choose(sampled, decode_logits[device_longs([s.slot for s in sampled], decode_logits.device)])
            self.stats.prefill_tokens += sum(c.length for c in plan.prefill)
            self.stats.decode_tokens += len(plan.decode)
            tokens = self.runner.read_back()
        except Exception as exc:  # a failed step fails the requests in it, never the engine
            self._step_logprobs = []
            self._fail({*plan.admitted, *(c.seq for c in plan.prefill), *plan.decode}, exc)
            return None
        logprobs, self._step_logprobs = self._step_logprobs, []
        for chunk in plan.prefill:
            chunk.seq.num_prefilled += chunk.length
            self.scheduler.prefilled(chunk.seq)
        for seq in finished_prefill:
            seq.status = SequenceStatus.DECODING
            seq.release_prompt()
        rows = [*finished_prefill, *plan.decode]
        for seq in rows:
            seq.num_generated += 1
        return _InFlight(rows, [s.slot for s in rows], tokens, logprobs)

    def _count_cached(self, admitted: list[Sequence]) -> None:
        for seq in admitted:
            if seq.request.prefix_keys is None:
                continue
            if seq.cached_positions:
                self.stats.prefix_hits += 1
                self.stats.prefix_cached_tokens += seq.cached_positions
            else:
                self.stats.prefix_misses += 1

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Tokens for ``seqs`` from their logits rows (penalties, the grammar mask, then greedy or their own
        generator), left on the
        device; their logprobs (of the raw logits) kept for when the step is read back. Runs after the (graphed)
        forward, on its logits: the graph itself stays as it is."""
        params = [s.request.params for s in seqs]
        raw = logits.float()
        grammars = [self._grammars.get(s) for s in seqs]
        penalized = [i for i, p in enumerate(params) if p.penalized]
        # The raw logits stay as they are (logprobs are theirs): penalties and the grammar mask work on a copy.
        processed = raw.clone() if penalized or any(grammars) else raw
        if penalized:
            counts, seen = zip(*(self._penalty_state(seqs[i], raw.shape[-1]) for i in penalized), strict=True)
            rows = device_longs(penalized, raw.device)
            processed[rows] = penalize(raw[rows], [params[i] for i in penalized], torch.stack(counts),
                                       torch.stack(seen))
        mask_logits(processed, grammars)
        chosen = choose_tokens(processed, params, [self._generators.get(s) for s in seqs])
        for i in penalized:
            self._counts[seqs[i]][0].index_add_(0, chosen[i:i + 1], torch.ones(1, device=raw.device))
        asked = [i for i, p in enumerate(params) if p.logprobs]
        if asked:
            rows = device_longs(asked, raw.device)
            self._step_logprobs.append(([seqs[i] for i in asked],
                                        step_logprobs(raw[rows], chosen[rows], [params[i] for i in asked])))
        self.runner.set_tokens([s.slot for s in seqs], chosen)

    def _penalty_state(self, seq: Sequence, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._counts.get(seq)
        if state is None:
            device = self.runner.device
            prompt = torch.tensor([seq.request.prompt_ids], device=device)
            state = torch.zeros(vocab, device=device), token_mask(prompt, None, vocab)[0]
            self._counts[seq] = state
        return state

    def _complete(self, step: _InFlight) -> None:
        """Wait for ``step``'s tokens and hand them out (to sequences still running: one may have stopped or
        been aborted since the step was launched)."""
        clock = time.perf_counter()
        try:
            tokens = step.tokens()
        except Exception as exc:
            self._fail(step.rows, exc)
            return
        waited = time.perf_counter()
        logprobs: dict[Sequence, TokenLogprob | None] = {}
        for seqs, values in step.logprobs:
            logprobs.update(zip(seqs, values.rows([s.request.params for s in seqs]), strict=True))
        for seq, slot in zip(step.rows, step.slots, strict=True):
            if seq.status is not SequenceStatus.FINISHED:
                self._append(seq, tokens[slot], logprobs.get(seq))
        self.stats.seconds["wait"] += waited - clock
        self.stats.seconds["update"] += time.perf_counter() - waited

    def _fail(self, seqs: Iterable[Sequence], exc: Exception) -> None:
        log.error("engine step failed", exc_info=exc)
        error = exc if isinstance(exc, TritonVLMError) else GenerationError(f"{type(exc).__name__}: {exc}")
        for seq in seqs:
            if seq.status is not SequenceStatus.FINISHED:
                self._finish(seq, "error", error)

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        request = seq.request
        if token in request.stop_token_ids:
            self._finish(seq, "stop")
            return
        if (state := self._grammars.get(seq)) is not None:
            state.accept(token)
        seq.output_ids.append(token)
        done = len(seq.output_ids) >= (seq.max_generated or 0)
        if done:
            self.scheduler.finish(seq, "length")
            self._forget(seq)
        first = (seq.admitted_at, time.perf_counter()) if len(seq.output_ids) == 1 else None
        request.on_output(RequestOutput(request.request_id, (token,), done, "length" if done else None,
                                        seq.prompt_len, len(seq.output_ids), cached_tokens=seq.cached_positions,
                                        logprobs=() if logprob is None else (logprob,), index=request.index,
                                        first_token_times=first))

    def _finish(self, seq: Sequence, reason: str, error: Exception | None = None) -> None:
        self.scheduler.finish(seq, reason)
        self._forget(seq)
        seq.request.on_output(RequestOutput(seq.request.request_id, (), True, reason, seq.prompt_len,
                                            len(seq.output_ids), error, cached_tokens=seq.cached_positions,
                                            index=seq.request.index))

    def _forget(self, seq: Sequence) -> None:
        self._generators.pop(seq, None)
        self._grammars.pop(seq, None)
        self._counts.pop(seq, None)

    # -- synchronous helper -------------------------------------------------------------------------------
    def generate(self, items: list[tuple[Any, Any, SamplingParams]], *, ignore_eos: bool | None = None,
                 timeout: float = 600.0) -> list[list[int]]:
        """Submit ``(images, prompt, params)`` items (as :meth:`prepare` takes them) and wait for all; returns the
        token ids of each one's choices in order (one list per item, or ``n`` consecutive lists for an item whose
        params ask for ``n`` choices).

        Works with or without the background thread (without it, this thread drives the steps). On timeout
        the unfinished requests are aborted (their KV slots freed) and :class:`GenerationError` is raised."""
        if not items:
            return []
        results: dict[tuple[str, int], list[int]] = {}
        done = threading.Event()
        remaining = [sum(params.n for _images, _prompt, params in items)]
        errors: dict[str, Exception] = {}
        lock = threading.Lock()

        def collect(out: RequestOutput) -> None:
            with lock:
                results.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
                if out.error is not None:
                    errors[out.request_id] = out.error
                if out.finished:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        requests = [self.prepare(image, prompt, params, collect, ignore_eos=ignore_eos)
                    for image, prompt, params in items]
        for request in requests:
            for index in range(request.params.n):
                results[request.request_id, index] = []
            self.submit(request)
        if self._thread is None:
            deadline = time.monotonic() + timeout
            while not done.is_set() and time.monotonic() < deadline:
                self._drain(block=False)
                self.step()
        else:
            done.wait(timeout)
        if not done.is_set():
            for request in requests:
                self.abort(request.request_id)
            if self._thread is None:
                self._drain(block=False)
            raise GenerationError(f"engine did not finish {len(items)} requests in {timeout:.0f}s")
        if errors:
            raise next(iter(errors.values()))
        return [results[r.request_id, index] for r in requests for index in range(r.params.n)]
