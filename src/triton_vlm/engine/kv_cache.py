"""A preallocated KV cache: one slot of ``max_len`` positions per running request, sized from free memory.

Slots make decode attention a plain strided view (no gather), which CUDA graphs can replay. Position
``max_len`` of every slot is a scratch column: rows of a decode batch that are not decoding write there, and
no attention mask ever reaches it.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("triton_vlm")


class SlotKVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_slots, num_kv_heads, max_len + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self.scratch_position = max_len
        self._free = list(range(num_slots))

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * (max_len + 1) * head_dim * element

    @classmethod
    def sized_for(cls, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, max_slots: int,
                  dtype: torch.dtype, device: torch.device, memory_fraction: float) -> SlotKVCache:
        """As many slots as fit in ``memory_fraction`` of free GPU memory, at most ``max_slots``."""
        per_slot = cls.bytes_per_slot(num_layers, num_kv_heads, head_dim, max_len, dtype)
        slots = max_slots
        if device.type == "cuda":
            torch.cuda.empty_cache()  # blocks the caching allocator holds count as used otherwise
            free, _total = torch.cuda.mem_get_info(device)
            slots = min(max_slots, int(free * memory_fraction) // per_slot)
            if slots < 1:
                raise MemoryError(f"KV cache: {per_slot / 2**30:.2f} GiB per slot, only {free / 2**30:.1f} GiB free; "
                                  "lower max_model_len")
        log.info("KV cache: %d slots x %d positions (%.2f GiB)", slots, max_len, slots * per_slot / 2**30)
        return cls(num_layers, slots, num_kv_heads, head_dim, max_len, dtype, device)

    # -- slot allocation (engine thread only) -------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def free_ids(self) -> list[int]:
        return sorted(self._free)

    def allocate(self, slot: int | None = None) -> int:
        """Take ``slot`` (a free one), or the lowest free slot: that keeps running slots packed at the front, so
        decode batches stay small."""
        if slot is None:
            slot = min(self._free)
        self._free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Enqueue a copy of ``source``'s first ``length`` positions of K/V into ``target`` (every layer)."""
        for layer in (*self.keys, *self.values):
            layer[target, :, :length].copy_(layer[source, :, :length])
