"""Executes what the scheduler planned: prompt embeddings (batched vision), prefill chunks, decode steps.

Tokens stay on the device: each step writes the token it chose for a slot into ``next_tokens``, the next decode
step reads its input there, and the host gets a step's tokens through an asynchronous copy (:meth:`read_back`)
that it waits for only after the next step has been launched. So the GPU never idles while Python sends
responses or schedules.

Decode steps replay CUDA graphs on GPU, one per batch bucket (and per context bucket where attention is not
the fused kernel); graphs are captured the first time a bucket is needed and share one memory pool.

Multimodal RoPE (a :class:`~triton_vlm.engine.adapter.PositionedDecoder`): each prompt's own rotary positions go to
the device at admission, and a decode row's position is its length - 1 plus its slot's offset in ``rope_offsets``,
a device tensor written at admission and read inside the graphs. Other decoders get neither.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from triton_vlm.config import EngineConfig
from triton_vlm.engine.adapter import (
    Decoder,
    EngineAdapter,
    MixingDecoder,
    PositionedDecoder,
    RowsDecoder,
    mixes,
    positioned,
    slotted,
)
from triton_vlm.engine.attention import avoid_per_shape_attention_plans
from triton_vlm.engine.kernels import fused_available
from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.request import EngineRequest, Sequence
from triton_vlm.engine.scheduler import PrefillChunk
from triton_vlm.engine.transfer import device_copy, device_longs
from triton_vlm.engine.vision import GraphedVision, fuse_quick_gelu

log = logging.getLogger("triton_vlm")

#: A graph key: (batch bucket, context bucket or None when attention reads lengths on the device).
GraphKey = tuple[int, int | None]


#: Row counts a prompt chunk run as decode rows is padded to (:meth:`ModelRunner.prefill_rows`), one graph each.
ROW_BUCKETS = (16, 32, 64, 128)


def batch_buckets(limit: int) -> list[int]:
    buckets = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    return sorted({b for b in buckets if b < limit} | {limit})


class ModelRunner:
    def __init__(self, adapter: EngineAdapter, model: Any, decoder: Decoder, cache: SlotKVCache,
                 config: EngineConfig) -> None:
        self.adapter = adapter
        self.model = model
        self.decoder = decoder
        self.cache = cache
        self.config = config
        self.device = cache.keys[0].device
        avoid_per_shape_attention_plans(self.device)
        self.buckets = batch_buckets(cache.num_slots)
        limit = cache.num_slots
        #: The latest token chosen for each slot (by a decode step or a prompt-completing prefill).
        self.next_tokens = torch.zeros(limit, dtype=torch.long, device=self.device)
        # Rows: K/V write position, attended length. Staged on the host, copied over in one go.
        pinned = self.device.type == "cuda"
        self._host_inputs = torch.zeros((2, limit), dtype=torch.long, pin_memory=pinned)
        self._host_np = self._host_inputs.numpy()  # same memory; numpy indexing is cheaper per step
        self._step_inputs = torch.zeros((2, limit), dtype=torch.long, device=self.device)
        # Two read-back buffers: step N's copy lands in one while the host still reads step N-1's from the other.
        self._read_buffers = [torch.zeros(limit, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._read_events = [torch.cuda.Event() for _ in range(2)] if pinned else []
        self._reads = 0
        #: Whether a step's prompt chunks and decode rows go through one forward (:meth:`prefill_and_decode`).
        self._mixing: MixingDecoder | None = decoder if mixes(decoder) else None
        self.mixes = self._mixing is not None
        #: Where the decoder takes rotary positions: each slot's decode offset (its request's ``rope_delta``).
        self._positioned: PositionedDecoder | None = decoder if positioned(decoder) else None
        self.rope_offsets = (torch.zeros(limit, dtype=torch.long, device=self.device)
                             if self._positioned is not None else None)
        #: Short text chunks as decode rows of their slot (``prefill_rows_max``; decoders whose rows name their slot
        #: and rotate by cache positions): rows' tokens, K/V write positions, attended lengths and slots.
        self._rows: RowsDecoder | None = (decoder if config.prefill_rows_max and slotted(decoder)
                                          and self._positioned is None else None)
        self._row_inputs = torch.zeros((4, ROW_BUCKETS[-1]), dtype=torch.long, device=self.device)
        #: Rows without graphs too (tests on the CPU). Only a graph makes rows pay: run eagerly they cost more than
        #: a prefill (the torch twin gathers the slot's K/V for every row).
        self.rows_eagerly = False
        self._row_graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        if fused_available(self.device):
            log.debug("engine: %d QuickGELU activations fused", fuse_quick_gelu(model))
        #: The adapter's vision tower for this model; graphed at small batches where images have one shape.
        self.encode_images: Callable[[torch.Tensor], torch.Tensor] = functools.partial(adapter.encode_images, model)
        image_shape = adapter.image_shape(model)
        if self.use_graphs and image_shape is not None:
            self.encode_images = GraphedVision(self.encode_images, image_shape, model.dtype, self.device)

    # -- prompts ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def build_prompt_embeds(self, seqs: list[Sequence]) -> None:
        """Prompt embeddings (image features in place) for newly admitted sequences, vision batched. A sequence whose
        images all lie in its cached prefix skips the vision tower: prefill never reads those rows."""
        embeds = self.adapter.prompt_embeds(self.model, self.decoder, [_uncached_request(s) for s in seqs],
                                            self.encode_images)
        for seq, embed in zip(seqs, embeds, strict=True):
            seq.prompt_embeds = embed
        if self.rope_offsets is not None:
            requests = [s.request for s in seqs]
            own = [r.prompt_positions for r in requests]
            if any(p is None for p in own):
                raise RuntimeError("engine: this decoder rotates by the prompt's own positions, which the request "
                                   "lacks (EngineAdapter.rope_positions)")
            positions = device_copy(torch.cat([p for p in own if p is not None], dim=-1), self.device, torch.long)
            for seq, part in zip(seqs, positions.split([s.prompt_len for s in seqs], dim=-1), strict=True):
                seq.prompt_positions = part
            self.rope_offsets[device_longs([s.slot for s in seqs], self.device)] = device_longs(
                [r.rope_delta for r in requests], self.device)

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Logits after each chunk's last position [chunks, vocab] (meaningful for prompt-completing ones)."""
        embeds, packed = _packed(chunks)
        if self._positioned is not None:
            hidden = self._positioned.prefill(embeds, packed, self.cache, _packed_positions(chunks))
        else:
            hidden = self.decoder.prefill(embeds, packed, self.cache)
        return self.decoder.logits(hidden)

    def takes_as_rows(self, chunks: list[PrefillChunk]) -> bool:
        """Whether :meth:`prefill_rows` runs ``chunks``: one chunk, short (``prefill_rows_max``), all text (its
        token ids embed as the prompt's embeddings do), where decode steps replay graphs."""
        if self._rows is None or len(chunks) != 1 or not (self.use_graphs or self.rows_eagerly):
            return False
        chunk = chunks[0]
        if chunk.length > min(self.config.prefill_rows_max, ROW_BUCKETS[-1]):
            return False
        end = chunk.start + chunk.length
        return not any(chunk.start <= row < end for row in chunk.seq.request.mm_inputs.get("image_rows") or ())

    @torch.inference_mode()
    def prefill_rows(self, chunk: PrefillChunk) -> torch.Tensor:
        """``chunk`` as decode rows of its slot, one a position (padded to a :data:`ROW_BUCKETS` size with idle
        rows), from a graph where there are graphs: each row stores its K/V and attends to the slot up to itself,
        which is causal prefill. Logits after its last position [1, vocab]. An eager prefill costs its kernel
        launches whatever its length; this costs one replay."""
        assert self._rows is not None
        size = next(b for b in ROW_BUCKETS if b >= chunk.length)
        start, n, slot = chunk.start, chunk.length, chunk.seq.slot
        idle = size - n
        inputs = [*chunk.seq.request.prompt_ids[start:start + n], *[0] * idle,
                  *range(start, start + n), *[self.cache.scratch_position] * idle,
                  *range(start + 1, start + n + 1), *[1] * idle,
                  *[slot] * size]
        self._row_inputs[:, :size].copy_(device_longs(inputs, self.device).view(4, size))
        context = None if self.decoder.fused else self._context_bound(start + n)
        logits = self._replayed(self._row_graphs, (size, context), lambda: self._capture_rows(size, context),
                                lambda: self._rows_step(size, context))
        return logits[n - 1:n]

    def _rows_step(self, size: int, context: int | None) -> torch.Tensor:
        assert self._rows is not None
        tokens, writes, lengths, slots = self._row_inputs[:, :size]
        return self._rows.decode(tokens, writes, lengths, self.cache, context, slots=slots)

    def _capture_rows(self, size: int, context: int | None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Idle rows: token 0 writing to the scratch column of slot 0, attending to one position.
        captured = self._captured(lambda: self._rows_step(size, context), self._row_inputs[:, :size],
                                  (0, self.cache.scratch_position, 1, 0))
        log.debug("captured prefill-rows graph rows=%d context=%s", size, context)
        return captured

    # -- tokens -------------------------------------------------------------------------------------------
    def set_tokens(self, slots: list[int], tokens: torch.Tensor) -> None:
        """Record tokens chosen outside a decode graph (prefill, sampled rows); no host sync."""
        self.next_tokens[device_longs(slots, self.device)] = tokens

    def read_back(self) -> Callable[[], list[int]]:
        """Start copying ``next_tokens`` (as the work enqueued so far leaves it) to the host; the returned
        function waits for that copy and gives the tokens by slot. On GPU the wait lets go of the GIL."""
        if not self._read_events:
            tokens = self.next_tokens.tolist()
            return lambda: tokens
        index = self._reads % 2
        self._reads += 1
        buffer, event = self._read_buffers[index], self._read_events[index]
        buffer.copy_(self.next_tokens, non_blocking=True)
        event.record()

        def wait() -> list[int]:
            event.synchronize()
            return buffer.tolist()
        return wait

    # -- decode -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], *, need_logits: bool = True) -> torch.Tensor | None:
        """One decode step for ``seqs`` (inputs: their slots' ``next_tokens``); greedy tokens land in
        ``next_tokens``. Returns the logits by slot [batch bucket, vocab] when asked (for sampled rows)."""
        batch = self.buckets[bisect.bisect_left(self.buckets, max(s.slot for s in seqs) + 1)]
        context = self._context(seqs)
        self._stage(seqs, batch)
        logits = self._replayed(self._graphs, (batch, context), lambda: self._capture(batch, context),
                                lambda: self._decode_step(batch, context))
        return logits if need_logits else None

    def _replayed(self, graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]], key: GraphKey,
                  capture: Callable[[], tuple[torch.cuda.CUDAGraph, torch.Tensor]],
                  eager: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The step ``key`` names, replayed from ``graphs`` (captured on first use) where there are graphs; else
        run eagerly. Its output (a graph's static one: read it before the next replay)."""
        if not self.use_graphs:
            return eager()
        graph, output = self._graph(graphs, key, capture)
        graph.replay()
        return output

    @staticmethod
    def _graph(graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]], key: GraphKey,
               capture: Callable[[], tuple[torch.cuda.CUDAGraph, torch.Tensor]]
               ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """``graphs[key]``, captured first where it is missing."""
        if key not in graphs:
            graphs[key] = capture()
        return graphs[key]

    @torch.inference_mode()
    def prefill_and_decode(self, chunks: list[PrefillChunk], seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`prefill` and :meth:`decode` as one forward (no graph: its shape changes every step, and a step
        of prefill outlasts its kernel launches). Returns (logits after each chunk, decode logits by slot)."""
        if self._mixing is None:
            raise RuntimeError("engine: prefill_and_decode on a decoder that does not mix (see ModelRunner.mixes)")
        batch = max(s.slot for s in seqs) + 1
        self._stage(seqs, batch)
        positions, lengths = self._step_inputs[0, :batch], self._step_inputs[1, :batch]
        tokens = self.next_tokens[:batch]
        prompt_positions = _packed_positions(chunks) if self._positioned is not None else None
        prefill_logits, logits = self._mixing.prefill_and_decode(
            *_packed(chunks), self.cache, tokens, positions, lengths, self._context(seqs),
            prompt_positions=prompt_positions, decode_positions=self._rope_positions(lengths))
        self._keep_greedy(tokens, positions, logits)
        return prefill_logits, logits

    def _context(self, seqs: list[Sequence]) -> int | None:
        """The attended-length bound of a decode step: None where the fused attention reads lengths on the
        device; else the longest row rounded up to a graph bucket."""
        if self.decoder.fused:
            return None
        return self._context_bound(max(s.length for s in seqs))

    def _context_bound(self, length: int) -> int:
        """``length`` rounded up to a graph bucket (``graph_len_step``), at most the cache's length."""
        step = self.config.graph_len_step
        return min(self.cache.max_len, -(-length // step) * step)

    def _stage(self, seqs: list[Sequence], batch: int) -> None:
        """Copy a decode step's per-row inputs (K/V write position, attended length) for rows ``[0, batch)`` to
        the device; rows without a decoding sequence write to the scratch column and attend to one position."""
        host = self._host_np
        host[0, :batch] = self.cache.scratch_position
        host[1, :batch] = 1
        slots = [s.slot for s in seqs]
        lengths = [s.length for s in seqs]
        host[0, slots] = [n - 1 for n in lengths]
        host[1, slots] = lengths
        self._step_inputs[:, :batch].copy_(self._host_inputs[:, :batch], non_blocking=True)

    def _decode_step(self, batch: int, context: int | None) -> torch.Tensor:
        """The step a graph holds: forward, then the greedy token into ``next_tokens`` for decoding rows."""
        positions, lengths = self._step_inputs[0, :batch], self._step_inputs[1, :batch]
        tokens = self.next_tokens[:batch]
        if self._positioned is not None:
            logits = self._positioned.decode(tokens, positions, lengths, self.cache, context,
                                             positions=self._rope_positions(lengths))
        else:
            logits = self.decoder.decode(tokens, positions, lengths, self.cache, context)
        self._keep_greedy(tokens, positions, logits)
        return logits

    def _rope_positions(self, lengths: torch.Tensor) -> torch.Tensor | None:
        """Decode rows' rotary positions, ``length - 1 + offset``, computed on the device (inside a graph); None
        where the decoder rotates by cache positions."""
        if self.rope_offsets is None:
            return None
        return lengths - 1 + self.rope_offsets[:lengths.shape[0]]

    def _keep_greedy(self, tokens: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor) -> None:
        # Idle rows keep their token: a slot whose prompt completed this step holds its first token there.
        tokens.copy_(torch.where(positions != self.cache.scratch_position, logits.argmax(dim=-1), tokens))

    def _capture(self, batch: int, context: int | None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Every row idle: scratch writes, attending to one position, tokens kept.
        captured = self._captured(lambda: self._decode_step(batch, context), self._step_inputs[:, :batch],
                                  (self.cache.scratch_position, 1))
        log.debug("captured decode graph batch=%d context=%s", batch, context)
        return captured

    def _captured(self, step: Callable[[], torch.Tensor], inputs: torch.Tensor,
                  idle: tuple[int, ...]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """``step`` as a CUDA graph (warmed up on a side stream first) and its output. Meanwhile ``inputs``, the
        step's staged rows, hold ``idle`` (a value a row) so that nothing real is written; then they are put back."""
        saved = inputs.clone()
        for row, value in enumerate(idle):
            inputs[row].fill_(value)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = step()
        inputs.copy_(saved)
        return graph, output

    @torch.inference_mode()
    def warmup(self, max_batch: int | None = None) -> None:
        """Capture every batch bucket ahead of traffic (at the first context bucket, where graphs have them), and
        the prefill rows' sizes where they run: a chat's first later turn would otherwise pay for its capture."""
        if not self.use_graphs:
            return
        if isinstance(self.encode_images, GraphedVision):
            self.encode_images.warmup()
        context = None if self.decoder.fused else self._context_bound(1)
        for batch in self.buckets:
            if max_batch and batch > max_batch:
                break
            self._graph(self._graphs, (batch, context), functools.partial(self._capture, batch, context))
        if self._rows is not None:
            for size in ROW_BUCKETS[:bisect.bisect_left(ROW_BUCKETS, self.config.prefill_rows_max) + 1]:
                self._graph(self._row_graphs, (size, context), functools.partial(self._capture_rows, size, context))


def _uncached_request(seq: Sequence) -> EngineRequest:
    """``seq``'s request as its prompt embeddings need it: without image rows where the prefix cache holds them all."""
    request = seq.request
    rows = request.mm_inputs.get("image_rows")
    if not rows or max(rows) >= seq.cached_positions:
        return request
    return dataclasses.replace(request, mm_inputs={**request.mm_inputs, "image_rows": []})


def _packed(chunks: list[PrefillChunk]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The chunks' prompt embeddings back to back [tokens, hidden], and each as ``(slot, start, length)``."""
    rows = []
    for c in chunks:
        embeds = c.seq.prompt_embeds
        if embeds is None:  # built at admission, dropped only once the whole prompt is in the cache
            raise RuntimeError(f"engine: request {c.seq.request.request_id} has no prompt embeddings left")
        rows.append(embeds[c.start:c.start + c.length])
    return torch.cat(rows), [(c.seq.slot, c.start, c.length) for c in chunks]


def _packed_positions(chunks: list[PrefillChunk]) -> torch.Tensor:
    """The chunks' own rotary positions back to back, in the order of :func:`_packed`: [rows, tokens]."""
    parts = []
    for c in chunks:
        own = c.seq.prompt_positions
        if own is None:
            raise RuntimeError(f"engine: request {c.seq.request.request_id} has no prompt positions left")
        parts.append(own[..., c.start:c.start + c.length])
    return torch.cat(parts, dim=-1)
