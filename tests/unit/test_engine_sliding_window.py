"""Mistral's sliding window in the engine's attention (torch paths, on CPU): prefill in fresh and continued chunks
of several slots at once, and decode, against dense attention over each query's last ``window`` positions. The
same run goes through the fused paths on a GPU (tests/gpu/test_kernels_gpu.py: flash prefill, the decode
kernel); the Triton decode kernel is also checked under the interpreter (kernel_checks.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from triton_vlm.engine.attention import causal_chunk_masks, decode_attention, prefill_attention, sliding_window
from triton_vlm.engine.kv_cache import SlotKVCache

HEADS, KV_HEADS, DIM = 4, 2, 16
#: Two prompts (slot 0: 40 positions, slot 1: 29), prefilled in three steps of packed chunks: fresh chunks shorter
#: and longer than the window, and continued chunks whose prefix the window cuts.
PROMPTS = {0: 40, 1: 29}
STEPS = [[(0, 0, 10), (1, 0, 16)], [(0, 10, 13), (1, 16, 13)], [(0, 23, 17)]]


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal attention of every position of one sequence ([tokens, heads, dim]) over its last ``window``
    positions, written out: [tokens, heads * dim]."""
    k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1).float() for t in (k, v))
    out = torch.empty(q.shape[0], HEADS, DIM)
    for i in range(q.shape[0]):
        first = 0 if window is None else max(0, i - window + 1)
        scores = torch.einsum("hd,thd->ht", q[i].float(), k[first:i + 1]) / DIM ** 0.5
        out[i] = torch.einsum("ht,thd->hd", scores.softmax(-1), v[first:i + 1])
    return out.reshape(q.shape[0], -1)


def windowed_run(window: int | None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 fused: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Prefill both prompts by :data:`STEPS`, then decode one token for each: (engine outputs by slot over the
    prompt and the decoded token [positions, hidden], dense reference by slot)."""
    generator = torch.Generator().manual_seed(0)
    qkv = {slot: [torch.randn(n + 1, h, DIM, generator=generator).to(device, dtype) for h in (HEADS, KV_HEADS, KV_HEADS)]
           for slot, n in PROMPTS.items()}
    cache = SlotKVCache(1, 2, KV_HEADS, DIM, 64, dtype, torch.device(device))
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for chunks in STEPS:
        q, k, v = (torch.cat([qkv[slot][i][start:start + n] for slot, start, n in chunks]) for i in range(3))
        attend = prefill_attention(cache, chunks, causal_chunk_masks(chunks, torch.device(device), window),
                                   gqa=True, fused=fused, causal=True, window=window)
        out = attend(0, q, k, v).float().cpu()
        for (slot, _, _), part in zip(chunks, out.split([n for _, _, n in chunks]), strict=True):
            got[slot].append(part)
    lengths = torch.tensor([n + 1 for n in PROMPTS.values()], device=device)
    attend = decode_attention(cache, lengths - 1, lengths, context=int(lengths.max()), fused=fused, window=window)
    q, k, v = (torch.stack([qkv[slot][i][n] for slot, n in PROMPTS.items()]) for i in range(3))
    decoded = attend(0, q, k, v).float().cpu()
    for slot in PROMPTS:
        got[slot].append(decoded[slot:slot + 1])
    return ({slot: torch.cat(parts) for slot, parts in got.items()},
            {slot: dense(*(t.cpu() for t in qkv[slot]), window) for slot in PROMPTS})


@pytest.mark.parametrize("window", [None, 8, 16, 100])
def test_prefill_chunks_and_decode_see_the_last_window_positions(window: int | None) -> None:
    got, expected = windowed_run(window)
    for slot in PROMPTS:
        torch.testing.assert_close(got[slot], expected[slot], atol=1e-5, rtol=1e-5)
    if window is not None and window < 40:  # the window changed the answer: the test would see it ignored
        _, unwindowed = windowed_run(None)
        assert not torch.allclose(expected[0][-1], unwindowed[0][-1], atol=1e-3)


def test_masks_stay_plain_causal_where_the_window_cuts_nothing() -> None:
    chunks = [(0, 0, 10), (1, 0, 30), (2, 5, 5)]
    masks = causal_chunk_masks(chunks, torch.device("cpu"), window=20)
    assert masks[0] is None  # SDPA's is_causal, as without a window
    assert masks[1] is not None and masks[1][25].nonzero().flatten().tolist() == list(range(6, 26))
    assert masks[2] is not None and masks[2][4].nonzero().flatten().tolist() == list(range(10))


def test_the_window_is_read_from_the_text_config() -> None:
    assert sliding_window(MistralConfig(sliding_window=32)) == 32
    assert sliding_window(MistralConfig(sliding_window=None)) is None
    assert sliding_window(LlamaConfig()) is None
    assert sliding_window(Qwen2Config()) is None  # use_sliding_window off: every layer full
    assert sliding_window(Qwen2Config(use_sliding_window=True, max_window_layers=0, num_hidden_layers=2)) == 4096
    with pytest.raises(NotImplementedError, match="some layers only"):
        sliding_window(Qwen2Config(use_sliding_window=True, max_window_layers=2, num_hidden_layers=4))
