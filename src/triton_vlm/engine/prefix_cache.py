"""Prefix caching over the slot KV cache: a prompt that starts like an earlier one skips the shared part.

A follow-up turn about the same picture repeats the image and the earlier turns; its prefill starts where it parts
from what a slot already holds, and the vision tower skips its images when all of them lie in the shared part.

**Keys.** A prompt is cut into blocks of ``block_size`` positions. A block's key hashes the key before it, its token
ids and the content of the images whose rows it holds (image placeholders are the same token for every image), so
one key names the whole prefix up to the end of its block, at that block's position and no other.

**Where cached K/V live.** Where a request left them: a finished request's slot keeps its blocks (it is *idle*)
until the slot is needed. A decode step is as wide as the highest running slot (row i reads slot i), and on an H100
a step of 8 rows costs about 6% more than a step of one (the matmuls leave their one-row kernels), so a new request
takes the lowest free slot, as it would without the cache, and the cache works around that:

- its longest cached prefix in that very slot: taken over, nothing to copy;
- elsewhere (an idle slot or a running request's): copied into it; but where every free slot holds blocks, an idle
  slot with the prefix is taken over where it is (bringing it down would push out another conversation's);
- the slot idle with another prompt's blocks: those move first to the highest free slot that holds nothing, else
  over the least recently used idle slot (where the slot's own blocks are the least recently used, they just go).

The runner enqueues these copies before anything of the step can write to either slot: a device-side copy of a
prompt's K/V (about 0.5 MB a position for a 7B model in fp16) costs well under a millisecond. So the cache takes
no memory beyond the slots the KV cache has anyway, and eviction is reuse.

Keys are built on the caller's thread (:func:`prompt_keys`); :class:`PrefixCache` belongs to the engine thread.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from triton_vlm.images import DIGEST_KEY

#: The key before a prompt's first block.
_ROOT = b""


def image_digest(image: Any) -> bytes:
    """The content of one PIL image: what its vision features depend on. The digest of the file it was decoded
    from where it carries one (:data:`~triton_vlm.images.DIGEST_KEY`: the same file is the same pixels, and hashing
    them again would cost about a millisecond a request), else of its mode, size and pixels."""
    file_digest = image.info.get(DIGEST_KEY) if hasattr(image, "info") else None
    if file_digest:
        return b"file:" + file_digest
    digest = hashlib.blake2b(f"{image.mode}:{image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return b"pixels:" + digest.digest()


def _block_key(previous: bytes, tokens: Sequence[int], images: bytes) -> bytes:
    digest = hashlib.blake2b(previous, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    digest.update(images)
    return digest.digest()


@dataclass(frozen=True)
class PrefixKeys:
    """A prompt's block keys (one per full block) and what extends them over the tokens generated after it."""

    block_size: int
    keys: tuple[bytes, ...]
    #: Block index -> the digests of the images whose rows the block holds (only blocks that hold image rows).
    images: dict[int, bytes]

    def over(self, tokens: Sequence[int]) -> tuple[bytes, ...]:
        """The keys of every full block of ``tokens``: this prompt's ids, then tokens generated after them."""
        keys = list(self.keys)
        size = self.block_size
        for block in range(len(keys), len(tokens) // size):
            keys.append(_block_key(keys[-1] if keys else _ROOT, tokens[block * size:(block + 1) * size],
                                   self.images.get(block, b"")))
        return tuple(keys)


def prompt_keys(prompt_ids: Sequence[int], image_rows: Sequence[int], images: Sequence[Any],
                block_size: int) -> PrefixKeys:
    """The block keys of a prepared prompt: ``image_rows`` are the positions that take image features and
    ``images`` the request's PIL images in prompt order."""
    marks: dict[int, list[bytes]] = {}
    for rows, digest in _rows_by_image(image_rows, [image_digest(image) for image in images]):
        for block in range(rows[0] // block_size, rows[-1] // block_size + 1):
            if digest not in (held := marks.setdefault(block, [])):
                held.append(digest)
    keys = PrefixKeys(block_size, (), {block: b"".join(digests) for block, digests in marks.items()})
    return PrefixKeys(block_size, keys.over(prompt_ids), keys.images)


def _rows_by_image(image_rows: Sequence[int], digests: list[bytes]) -> list[tuple[list[int], bytes]]:
    """Each run of consecutive image rows with the digest of the image it shows. Where the runs are not one per
    image (a family that interleaves tile markers, or two images back to back), every run is marked with all the
    images: fewer hits, never a wrong one."""
    runs: list[list[int]] = []
    for row in image_rows:
        if runs and row == runs[-1][-1] + 1:
            runs[-1].append(row)
        else:
            runs.append([row])
    if len(runs) == len(digests):
        return list(zip(runs, digests, strict=True))
    everything = hashlib.blake2b(b"".join(digests), digest_size=16).digest()
    return [(run, everything) for run in runs]


@dataclass(frozen=True)
class Placement:
    """Where an admitted request goes: its slot, the positions of its prompt there once ``copies`` ran, and those
    copies ``(source slot, target slot, positions)``, to run in order before the step writes to any of them."""

    slot: int
    cached: int = 0
    copies: tuple[tuple[int, int, int], ...] = ()


class PrefixCache:
    """Which blocks each slot holds, and which idle slots to reuse first. Engine thread only."""

    def __init__(self, num_slots: int, block_size: int) -> None:
        self.block_size = block_size
        #: Each slot's blocks with valid K/V, in prompt order (their keys).
        self._blocks: list[tuple[bytes, ...]] = [() for _ in range(num_slots)]
        #: Block key -> the slots that hold it.
        self._holders: dict[bytes, set[int]] = {}
        #: Free slots that still hold blocks, least recently used first.
        self._idle: OrderedDict[int, None] = OrderedDict()

    def place(self, keys: PrefixKeys | None, free: Sequence[int], prompt_len: int, min_cached: int = 0) -> Placement:
        """The lowest of the ``free`` slots for a new request (where every free slot holds a prefix: the idle one
        holding this prompt's), with the longest cached prefix of its prompt there once the placement's copies ran (at
        least one prompt position is left to prefill: its logits give the first token; a prefix shorter than
        ``min_cached``, one the model must see in one chunk, counts as none). The slot now belongs to the request."""
        slot = min(free)
        source, blocks = (-1, 0) if keys is None else self._longest(keys.keys[:(prompt_len - 1) // self.block_size])
        if blocks * self.block_size < min_cached:
            source, blocks = -1, 0
        if source in free and all(self._blocks[other] for other in free):
            slot = source  # every free slot holds a prefix: moving one down would cost another, so run where it is
        copies = []
        if source != slot:
            move = self._move_out(slot, free, keep=source)
            copies = [move] if move is not None else []
            if source >= 0:
                copies.append((source, slot, blocks * self.block_size))
        self._hold(slot, keys.keys[:blocks] if keys is not None else ())
        return Placement(slot, blocks * self.block_size, tuple(copies))

    def extend(self, slot: int, keys: Sequence[bytes]) -> None:
        """``slot``'s K/V now hold ``keys`` (a longer prefix of the same chain), as launched work leaves them."""
        if len(keys) > len(self._blocks[slot]):
            self._hold(slot, tuple(keys))

    def release(self, slot: int) -> None:
        """``slot``'s request finished: its blocks stay for later requests until the slot is reused."""
        self._idle.pop(slot, None)
        if self._blocks[slot]:
            self._idle[slot] = None

    def forget(self, slot: int) -> None:
        """``slot``'s K/V are not to be trusted (a failed step wrote there)."""
        self._hold(slot, ())
        self._idle.pop(slot, None)

    def _longest(self, keys: Sequence[bytes]) -> tuple[int, int]:
        """(slot, blocks): a slot holding the longest prefix of ``keys``, idle ones first; (-1, 0) where none."""
        holders: set[int] = set()
        blocks = 0
        for key in keys:
            found = self._holders.get(key)
            if not found:
                break
            holders, blocks = found, blocks + 1
        if not blocks:
            return -1, 0
        idle = [slot for slot in holders if slot in self._idle]
        return min(idle or holders), blocks

    def _move_out(self, slot: int, free: Sequence[int], keep: int) -> tuple[int, int, int] | None:
        """Move ``slot``'s idle blocks to the highest free slot that holds nothing, else over the least recently used
        idle slot other than ``keep`` (the new request's source); the copy to enqueue, or None where ``slot`` held
        nothing or its blocks were the ones to go."""
        held = self._blocks[slot]
        if not held:
            return None
        empty = [other for other in free if other != slot and not self._blocks[other]]
        if empty:
            target = max(empty)
        else:
            order = list(self._idle)
            victims = [other for other in order if other in free and other not in (slot, keep)]
            if not victims or (slot in self._idle and order.index(slot) < order.index(victims[0])):
                return None  # nowhere to go, or the least recently used: dropped
            target = victims[0]
        # The moved blocks keep their place in the LRU order.
        self._idle = OrderedDict((target if other == slot else other, None)
                                 for other in self._idle if other != target)
        self._hold(target, held, idle=True)
        return slot, target, len(held) * self.block_size

    def _hold(self, slot: int, keys: tuple[bytes, ...], idle: bool = False) -> None:
        """``slot`` now holds exactly ``keys``: the blocks it held beyond them (or all, on another chain) go. Unless
        ``idle``, a request has the slot."""
        held = self._blocks[slot]
        for key in held[len(keys):] if held[:len(keys)] == keys else held:
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del self._holders[key]
        for key in keys:
            self._holders.setdefault(key, set()).add(slot)
        self._blocks[slot] = keys
        if not idle:
            self._idle.pop(slot, None)
