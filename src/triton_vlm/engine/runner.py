"""Executes what the scheduler planned: prompt embeddings (batched vision), prefill chunks, decode steps.

Decode steps replay CUDA graphs on GPU, one per (batch bucket, context bucket); graphs are captured the first
time a bucket is needed and share one memory pool.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

import torch

from triton_vlm.engine.config import EngineConfig
from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.llama import LlamaDecoder
from triton_vlm.engine.request import Sequence
from triton_vlm.engine.scheduler import PrefillChunk

log = logging.getLogger("triton_vlm")


def batch_buckets(limit: int) -> list[int]:
    buckets = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    return sorted({b for b in buckets if b < limit} | {limit})


class ModelRunner:
    def __init__(self, adapter: Any, model: Any, decoder: LlamaDecoder, cache: SlotKVCache,
                 config: EngineConfig) -> None:
        self.adapter = adapter
        self.model = model
        self.decoder = decoder
        self.cache = cache
        self.config = config
        self.device = cache.keys[0].device
        self.buckets = batch_buckets(cache.num_slots)
        limit = cache.num_slots
        # Rows: token, K/V write position, attended length. Staged on the host, copied over in one go.
        pinned = self.device.type == "cuda"
        self._host_inputs = torch.zeros((3, limit), dtype=torch.long, pin_memory=pinned)
        self._host_np = self._host_inputs.numpy()  # same memory; numpy indexing is cheaper per step
        self._host_tokens = torch.zeros(limit, dtype=torch.long, pin_memory=pinned)
        self._step_done = torch.cuda.Event() if self.device.type == "cuda" else None
        self._step_inputs = torch.zeros((3, limit), dtype=torch.long, device=self.device)
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # -- prompts ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def build_prompt_embeds(self, seqs: list[Sequence]) -> None:
        """Prompt embeddings (image features in place) for newly admitted sequences, vision batched."""
        embeds = self.adapter.prompt_embeds(self.model, self.decoder, [s.request for s in seqs])
        for seq, embed in zip(seqs, embeds):
            seq.prompt_embeds = embed

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Logits after each chunk's last position [chunks, vocab] (meaningful for prompt-completing ones)."""
        embeds = torch.cat([c.seq.prompt_embeds[c.start:c.start + c.length] for c in chunks])  # type: ignore[index]
        hidden = self.decoder.prefill(embeds, [(c.seq.slot, c.start, c.length) for c in chunks], self.cache)
        return self.decoder.logits(hidden)

    # -- decode -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], *, need_logits: bool = True) -> tuple[torch.Tensor | None, list[int]]:
        """Next-token logits (in ``seqs`` order, or None when not needed) and each sequence's greedy token."""
        batch = self.buckets[bisect.bisect_left(self.buckets, max(s.slot for s in seqs) + 1)]
        longest = max(s.length for s in seqs)
        step = self.config.graph_len_step
        context = min(self.cache.max_len, -(-longest // step) * step)
        host = self._host_np
        host[0, :batch] = 0
        host[1, :batch] = self.cache.scratch_position
        host[2, :batch] = 1
        slots = [s.slot for s in seqs]
        lengths = [s.length for s in seqs]
        host[0, slots] = [s.last_token for s in seqs]
        host[1, slots] = [n - 1 for n in lengths]
        host[2, slots] = lengths
        self._step_inputs[:, :batch].copy_(self._host_inputs[:, :batch], non_blocking=True)
        if self.use_graphs:
            logits, greedy = self._replay(batch, context)
        else:
            logits = self._decode_eager(batch, context)
            greedy = logits.argmax(dim=-1)
        greedy_tokens = self._to_host(greedy)
        rows = torch.tensor(slots, device=self.device)
        return (logits[rows] if need_logits else None), [greedy_tokens[slot] for slot in slots]

    def _to_host(self, tokens: torch.Tensor) -> list[int]:
        """Tokens as a list. On GPU: an async copy and an event wait, which (unlike ``tolist``) lets go of the
        GIL while the step runs, so the response thread works in parallel instead of between steps."""
        if self._step_done is None:
            return tokens.tolist()
        host = self._host_tokens[:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        self._step_done.record()
        self._step_done.synchronize()
        return host.tolist()

    def _decode_eager(self, batch: int, context: int) -> torch.Tensor:
        return self.decoder.decode(self._step_inputs[:, :batch], self.cache, context)

    def _replay(self, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (batch, context)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch, context)
        graph, logits, greedy = self._graphs[key]
        graph.replay()
        return logits, greedy

    def _capture(self, batch: int, context: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        # Capture with every row idle (scratch writes), then restore the real inputs.
        saved = self._step_inputs[:, :batch].clone()
        self._step_inputs[0, :batch].zero_()
        self._step_inputs[1, :batch].fill_(self.cache.scratch_position)
        self._step_inputs[2, :batch].fill_(1)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_eager(batch, context).argmax(dim=-1)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._decode_eager(batch, context)
            greedy = logits.argmax(dim=-1)
        self._step_inputs[:, :batch].copy_(saved)
        log.debug("captured decode graph batch=%d context=%d", batch, context)
        return graph, logits, greedy

    @torch.inference_mode()
    def warmup(self, max_batch: int | None = None) -> None:
        """Capture every batch bucket at the first context bucket ahead of traffic."""
        if not self.use_graphs:
            return
        for batch in self.buckets:
            if max_batch and batch > max_batch:
                break
            key = (batch, min(self.cache.max_len, self.config.graph_len_step))
            if key not in self._graphs:
                self._graphs[key] = self._capture(*key)
