"""Attention over the slot KV cache, shared by the decoders: each call stores the new K/V, then attends.

A decoder's layer loop calls the ``attend(index, q, k, v)`` that :func:`prefill_attention` or
:func:`decode_attention` builds; only the masks differ between model families (the decoders build them). The
cache may hold fp8 (:mod:`.quantization`): K/V are stored saturated and read back in the model's dtype.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from triton_vlm.engine import kernels
from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.quantization import FP8_MAX, to_storage
from triton_vlm.engine.transfer import device_longs

log = logging.getLogger("triton_vlm")

#: ``attend(layer index, q, k, v)`` -> attention output [tokens, heads * head_dim]; q/k/v are [tokens, heads, dim].
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def avoid_per_shape_attention_plans(device: torch.device) -> None:
    """Keep PyTorch's SDPA off its cuDNN backend on CUDA.

    cuDNN builds an execution plan the first time it meets a shape: about 36 ms on an H100 per new sequence
    length or batch size, where flash attention needs 0.2 ms and then runs as fast (timed at commit 52cedf7 by
    a phase probe since deleted). A server meets new prompt lengths, chunk lengths and vision batch sizes all the
    time, so those plans were what made first-token latency jump and a cold 64-client run lose 1.6 s of 11. The
    setting is process-wide: the engine owns the process it serves from, and its other models gain the same."""
    if device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("engine: SDPA's cuDNN backend is off (it plans per shape); flash attention serves instead")


def prefill_attention(cache: SlotKVCache, chunks: list[tuple[int, int, int]], masks: Sequence[torch.Tensor | None],
                      gqa: bool, fused: bool = False, causal: bool = False, window: int | None = None) -> Attend:
    """For packed chunks ``(slot, start, length)`` (back to back in q/k/v). A chunk's mask [length, start +
    length] says which cached positions each of its queries sees; None is plain causal from position 0.
    ``fused``: every chunk's K/V stored by one kernel a layer (instead of a few copies per chunk). ``causal``:
    the masks are :func:`causal_chunk_masks`' (with ``window``, a sliding window's); then on GPU one
    variable-length flash-attention call a layer serves every chunk (an SDPA call per chunk cost llava's c64
    benchmark 0.13 s of 2.13 s of fp8 prefill), given the same window."""
    device = cache.keys[0].device
    if fused:
        token_slots = device_longs([slot for slot, _, length in chunks for _ in range(length)], device)
        token_positions = chunk_positions(chunks, device)
    flash = _FLASH_VARLEN if fused and causal and flash_varlen_available(device) else None
    if flash is not None:
        lengths = [length for _, _, length in chunks]
        spans = [start + length for _, start, length in chunks]
        bounds = device_longs([0, *itertools.accumulate(lengths), 0, *itertools.accumulate(spans)], device).int()
        query_bounds, key_bounds = bounds[:len(chunks) + 1], bounds[len(chunks) + 1:]
        fresh_only = all(start == 0 for _, start, _ in chunks)
        # A query sees itself and the window - 1 positions before it (transformers' sliding-window mask).
        windowed = {} if window is None else {"window_size_left": window - 1, "window_size_right": 0}

    def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = cache.keys[index], cache.values[index]
        stored = fused and kernels.store_kv(k, v, keys, values, token_slots, token_positions, FP8_MAX)
        if flash is not None and stored and q.dtype in (torch.float16, torch.bfloat16):
            if not fresh_only:
                k, v = _packed_context(keys, k, chunks), _packed_context(values, v, chunks)
            # Causal with fewer queries than keys lines the queries up with the last keys (flash attention's
            # rule): a continued chunk sees its slot's whole prefix, as causal_chunk_masks says.
            out = flash(q, k, v, query_bounds, key_bounds, max(lengths), max(spans), 0.0, True, False,
                        **windowed)[0]
            return out.reshape(q.shape[0], -1)
        outputs = []
        offset = 0
        for (slot, start, length), mask in zip(chunks, masks, strict=True):
            end = start + length
            chunk_k = k[offset:offset + length].transpose(0, 1)
            chunk_v = v[offset:offset + length].transpose(0, 1)
            if not stored:
                keys[slot, :, start:end] = to_storage(chunk_k, keys.dtype)
                values[slot, :, start:end] = to_storage(chunk_v, values.dtype)
            out = F.scaled_dot_product_attention(
                q[offset:offset + length].transpose(0, 1)[None], _context(keys[slot], chunk_k, start)[None],
                _context(values[slot], chunk_v, start)[None], attn_mask=mask, is_causal=mask is None,
                enable_gqa=gqa)
            outputs.append(out[0].transpose(0, 1).reshape(length, -1))
            offset += length
        return torch.cat(outputs)

    return attend


#: PyTorch's variable-length flash attention (packed sequences with cumulative bounds; CUDA only). An ATen op,
#: not public API: without it, prefill takes the per-chunk SDPA path.
_FLASH_VARLEN = getattr(torch.ops.aten, "_flash_attention_forward", None)


def flash_varlen_available(device: torch.device) -> bool:
    """Whether prefill may use :data:`_FLASH_VARLEN` on ``device``: flash attention needs an Ampere GPU or newer
    (compute capability 8.0); older ones keep the per-chunk SDPA path, which has other backends."""
    return (_FLASH_VARLEN is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (8, 0))


def _packed_context(cached: torch.Tensor, fresh: torch.Tensor, chunks: list[tuple[int, int, int]]) -> torch.Tensor:
    """Each chunk's :func:`_context` (``cached`` [slots, heads, positions, dim], ``fresh`` the packed new rows
    [tokens, heads, dim]) back to back, token-major: [sum of start + length, heads, dim]."""
    pieces = []
    offset = 0
    for slot, start, length in chunks:
        chunk = fresh[offset:offset + length].transpose(0, 1)
        pieces.append(_context(cached[slot], chunk, start).transpose(0, 1))
        offset += length
    return torch.cat(pieces)


def _context(cached: torch.Tensor, chunk: torch.Tensor, start: int) -> torch.Tensor:
    """A slot's K (or V) [heads, start + length, dim] for a chunk at ``start``: the cache's own view when it holds
    the model's dtype; from an fp8 cache, the prefix read back and the chunk's own (exact) values."""
    if cached.dtype == chunk.dtype:
        return cached[:, :start + chunk.shape[1]]
    if start == 0:
        return chunk
    return torch.cat([cached[:, :start].to(chunk.dtype), chunk], dim=1)


def chunk_positions(chunks: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """The prompt positions of packed chunks ``(slot, start, length)``, back to back: [tokens]."""
    return torch.cat([torch.arange(start, start + length, device=device) for _, start, length in chunks])


def causal_chunk_masks(chunks: list[tuple[int, int, int]], device: torch.device,
                       window: int | None = None) -> list[torch.Tensor | None]:
    """Masks for :func:`prefill_attention` over causal prompts: a chunk from position 0 is plain causal (None);
    a later one sees the whole cached prefix and is causal within itself. With a sliding ``window`` a query
    sees only its last ``window`` positions (itself included), where that cuts anything off."""
    masks: list[torch.Tensor | None] = []
    for _, start, length in chunks:
        end = start + length
        if start == 0 and (window is None or end <= window):
            masks.append(None)
            continue
        keys, queries = torch.arange(end, device=device)[None, :], torch.arange(start, end, device=device)[:, None]
        mask = keys <= queries
        if window is not None:
            mask &= keys > queries - window
        masks.append(mask)
    return masks


def sliding_window(config: Any) -> int | None:
    """The sliding window a Hugging Face text config sets for every layer (Mistral's ``sliding_window``), or None.
    Configs with ``layer_types`` (Qwen2's) say per layer; a mix of windowed and full layers is refused rather than
    served wrong."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ())
    if not window or (kinds and "sliding_attention" not in kinds):
        return None
    if kinds - {"sliding_attention"}:
        raise NotImplementedError(f"layers of kinds {sorted(kinds)}: a sliding window on some layers only")
    return int(window)


def last_rows(hidden: torch.Tensor, chunks: list[tuple[int, int, int]]) -> torch.Tensor:
    """Each packed chunk's last row of ``hidden`` [tokens, dim] -> [chunks, dim] (no host sync)."""
    ends = device_longs([n for _, _, n in chunks], hidden.device).cumsum(0) - 1
    return hidden[ends]


def decode_attention(cache: SlotKVCache, write_positions: torch.Tensor, lengths: torch.Tensor,
                     context: int | None, fused: bool, window: int | None = None,
                     slots: torch.Tensor | None = None) -> Attend:
    """For one token per row, row i in slot i (or in ``slots[i]``: a prompt chunk run as rows of one slot, each
    row's K/V stored before any row attends, so row j sees rows up to j): the fused kernel reads each row's length
    on the device; the torch twin masks up to ``context``. ``window``: each row sees only its last ``window``
    positions."""
    rows = torch.arange(write_positions.shape[0], device=write_positions.device) if slots is None else slots

    def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = cache.keys[index], cache.values[index]
        if not (fused and kernels.store_kv(k, v, keys, values, rows, write_positions, FP8_MAX)):
            keys[rows, :, write_positions] = to_storage(k, keys.dtype)
            values[rows, :, write_positions] = to_storage(v, values.dtype)
        if fused:
            return kernels.decode_attention(q, keys, values, lengths, window=window, slots=slots)
        return kernels.decode_attention_torch(q, keys, values, lengths, context, window, slots)

    return attend


def mixed_attention(prefill: Attend, decode: Attend, prefill_tokens: int) -> Attend:
    """One attend for a forward whose first ``prefill_tokens`` rows are prompt chunks (``prefill``) and whose
    other rows are one decode token per slot (``decode``)."""

    def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = prefill_tokens
        return torch.cat([prefill(index, q[:n], k[:n], v[:n]), decode(index, q[n:], k[n:], v[n:])])

    return attend
