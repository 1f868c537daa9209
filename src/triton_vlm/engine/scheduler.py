"""Continuous batching: which requests run in the next step, and how much of each prompt is prefilled.

Every step decodes all running sequences that have tokens left to generate, and spends at most
``max_prefill_tokens`` on prompts (oldest first, chunked), so a long prompt never stalls the decodes already under
way. A prompt whose first chunk must hold a bidirectional prefix (``min_first_chunk``) waits for a step with room
for it, or takes a step alone and exceeds the budget once.

With a :class:`~triton_vlm.engine.prefix_cache.PrefixCache`, the scheduler also decides which slot a new request
takes (the lowest free one, as without the cache, and the copies that bring its longest cached prefix there; see
:meth:`~triton_vlm.engine.prefix_cache.PrefixCache.place` for the one exception) and tells the cache which blocks
each slot holds as prompts are prefilled and requests finish.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from triton_vlm.config import EngineConfig
from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.prefix_cache import PrefixCache
from triton_vlm.engine.request import Sequence, SequenceStatus


@dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == self.seq.prompt_len


@dataclass
class SchedulerOutput:
    #: Sequences admitted this step: their prompt embeddings (vision included) must be built first.
    admitted: list[Sequence] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    #: Cached prefixes to copy before anything else of the step: ``(source slot, target slot, positions)``.
    copies: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode)


class Scheduler:
    """Owns the waiting queue and the running set; the engine thread is its only caller."""

    def __init__(self, config: EngineConfig, cache: SlotKVCache, prefix: PrefixCache | None = None) -> None:
        self.config = config
        self.cache = cache
        self.prefix = prefix
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        limit = min(self.config.max_num_seqs, self.cache.num_slots)
        held: list[Sequence] = []
        while self.waiting and len(self.running) < limit and self.cache.free_slots:
            seq = self.waiting.popleft()
            if seq.after is not None and seq.after.status in (SequenceStatus.WAITING, SequenceStatus.PREFILLING):
                held.append(seq)  # its first choice's prompt is not in the cache yet
                continue
            self._place(seq, out)
            seq.status = SequenceStatus.PREFILLING
            self.running.append(seq)
            out.admitted.append(seq)
        budget = self.config.max_prefill_tokens
        for seq in self.running:
            if seq.wants_decode:
                out.decode.append(seq)
            elif seq.status is SequenceStatus.PREFILLING and budget > 0:
                remaining = seq.prompt_len - seq.num_prefilled
                length = min(remaining, budget)
                first = min(seq.request.min_first_chunk, remaining) if seq.num_prefilled == 0 else 0
                if length < first:
                    if out.prefill:
                        break  # it waits for a step with room; later prompts wait behind it
                    length = first  # alone in its step: over the budget rather than never
                out.prefill.append(PrefillChunk(seq, seq.num_prefilled, length))
                budget -= length
        self.waiting.extendleft(reversed(held))
        return out

    def _place(self, seq: Sequence, out: SchedulerOutput) -> None:
        if self.prefix is None:
            seq.slot = self.cache.allocate()
            return
        request = seq.request
        placement = self.prefix.place(request.prefix_keys, self.cache.free_ids, seq.prompt_len,
                                      request.min_first_chunk)
        seq.slot = self.cache.allocate(placement.slot)
        seq.num_prefilled = seq.cached_positions = placement.cached
        out.copies.extend(placement.copies)

    def prefilled(self, seq: Sequence) -> None:
        """``seq``'s prompt is in its slot up to ``num_prefilled`` (as the work launched so far leaves it)."""
        keys = seq.request.prefix_keys
        if self.prefix is not None and keys is not None:
            self.prefix.extend(seq.slot, keys.keys[:seq.num_prefilled // keys.block_size])

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of the queue or the running set and give its slot back (keeping its cached blocks,
        where it has any, for later requests)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.release_prompt()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot >= 0:
            if self.prefix is not None:
                self._keep_blocks(seq, reason)
            self.cache.release(seq.slot)
            seq.slot = -1

    def _keep_blocks(self, seq: Sequence, reason: str) -> None:
        assert self.prefix is not None
        keys = seq.request.prefix_keys
        if reason == "error":  # a failed step may have written part of its rows
            self.prefix.forget(seq.slot)
            return
        if keys is not None and reason in ("stop", "length") and seq.output_ids:
            # The last token read back was chosen but never fed back: its K/V are not in the slot.
            self.prefix.extend(seq.slot, keys.over([*seq.request.prompt_ids, *seq.output_ids[:-1]]))
        self.prefix.release(seq.slot)

    def find(self, request_id: str) -> list[Sequence]:
        """The sequences of ``request_id`` still queued or running (one per choice)."""
        return [seq for seq in (*self.running, *self.waiting) if seq.request.request_id == request_id]
