"""fp8 in the engine (triton_vlm.engine.quantization), on CPU with the torch twins: per-channel weights and
per-row activations, a saturating fp8 KV cache, the Llama decoder quantized, and the settings that turn it on.
The GPU kernels are checked against these twins by tests/gpu (on a CUDA device)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from triton_vlm.config import read_settings
from triton_vlm.engine import EngineConfig, LLMEngine, quantization
from triton_vlm.engine.attention import decode_attention, prefill_attention
from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.quantization import (
    FP8,
    FP8_KERNEL_MAX_ROWS,
    FP8_MAX,
    WEIGHT_ONLY_MAX_ROWS,
    Fp8Rows,
    Fp8Weight,
    check_fp8_support,
    kv_cache_dtype,
    linear,
    quantize_rows,
    takes_fp8_rows,
    to_storage,
)
from triton_vlm.errors import GenerationError, InvalidInputError
from triton_vlm.sampling import SamplingParams

from .helpers import load_tiny, noise

#: e4m3 keeps 3 mantissa bits: a value rounds to within 1/16 of itself (a little more near zero).
E4M3_STEP = 1 / 16


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


# -- the pieces ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_a_weight_keeps_one_scale_per_output_channel(layout: str) -> None:
    weight = torch.randn(48, 64) * torch.logspace(-3, 1, 48)[:, None]  # rows four decades apart
    if layout == "column-major":  # as weights.relayout may leave an engine weight
        weight = weight.t().contiguous().t()
    quantized = Fp8Weight.quantize(weight)
    assert quantized.data.dtype == FP8 and quantized.data.shape == (64, 48)
    # Column-major [in, out] whatever the weight's layout: _scaled_mm refuses others and the fp8 kernels read
    # data.t() as row-major [out, in] (a column-major weight once gave them transposed data on the GPU).
    assert quantized.data.t().is_contiguous()
    assert quantized.scale.shape == (1, 48)
    assert torch.allclose(quantized.scale[0] * FP8_MAX, weight.abs().amax(dim=1))
    restored = quantized.dequantize()
    # Per channel, the small rows keep their precision (one scale for the whole tensor would flush them to 0).
    for row in (0, 47):
        assert relative_error(restored[row], weight[row]) < E4M3_STEP
    assert quantized.nbytes == 64 * 48 + 48 * 4


def test_rows_are_quantized_each_with_its_own_scale() -> None:
    x = torch.randn(5, 96)
    x[1] *= 1000
    x[3] = 0
    values, scales = quantize_rows(x)
    assert values.dtype == FP8 and scales.shape == (5, 1) and scales.dtype == torch.float32
    assert values.float().abs().amax(dim=1)[[0, 1, 2, 4]].eq(FP8_MAX).all()  # each row's peak maps to 448
    restored = values.float() * scales
    assert torch.equal(restored[3], torch.zeros(96))
    for row in (0, 1, 2, 4):
        assert relative_error(restored[row], x[row]) < E4M3_STEP


@pytest.mark.parametrize("rows", [1, WEIGHT_ONLY_MAX_ROWS, WEIGHT_ONLY_MAX_ROWS + 1, FP8_KERNEL_MAX_ROWS + 1])
def test_fp8_linear_is_close_to_the_dense_one(rows: int) -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(rows, 128), torch.randn(80, 128)
    quantized = Fp8Weight.quantize(weight)
    dense = F.linear(x, weight)
    out = linear(x, quantized)
    assert out.shape == dense.shape and out.dtype == dense.dtype
    assert relative_error(out, dense) < 0.05
    weight_only = F.linear(x, quantized.dequantize())  # decode-sized batches keep their inputs unquantized
    if rows <= WEIGHT_ONLY_MAX_ROWS:
        assert torch.equal(out, weight_only)
    else:  # larger ones are quantized per row too, for the fp8 tensor cores
        values, scales = quantize_rows(x)
        assert torch.allclose(out, F.linear(values.float() * scales, quantized.dequantize()), atol=1e-4)
        assert not torch.equal(out, weight_only)
    assert torch.equal(linear(x, weight), dense)  # a dense weight is a plain F.linear


@pytest.mark.parametrize("rows", [WEIGHT_ONLY_MAX_ROWS + 1, FP8_KERNEL_MAX_ROWS + 1])
def test_inputs_quantized_beforehand_give_what_linear_would_have(rows: int) -> None:
    torch.manual_seed(1)
    x, weight = torch.randn(rows, 128), Fp8Weight.quantize(torch.randn(80, 128))
    assert takes_fp8_rows(weight, rows)
    assert torch.equal(linear(Fp8Rows(*quantize_rows(x)), weight), linear(x, weight))


def test_inputs_quantized_beforehand_go_only_where_linear_quantizes() -> None:
    weight = torch.randn(80, 128)
    few = Fp8Rows(*quantize_rows(torch.randn(WEIGHT_ONLY_MAX_ROWS, 128)))
    many = Fp8Rows(*quantize_rows(torch.randn(WEIGHT_ONLY_MAX_ROWS + 1, 128)))
    assert not takes_fp8_rows(weight, 100) and not takes_fp8_rows(Fp8Weight.quantize(weight), WEIGHT_ONLY_MAX_ROWS)
    with pytest.raises(TypeError, match="Fp8Rows go only to fp8 weights"):
        linear(many, weight)  # a dense weight
    with pytest.raises(TypeError, match="Fp8Rows go only to fp8 weights"):
        linear(few, Fp8Weight.quantize(weight))  # the weight-only band keeps its inputs in the model's dtype


def test_fp8_storage_saturates_instead_of_turning_to_nan() -> None:
    x = torch.tensor([1000.0, -1e6, 3.0, 0.0])
    assert to_storage(x, FP8).float().tolist() == [FP8_MAX, -FP8_MAX, 3.0, 0.0]
    assert to_storage(x, torch.float32) is x
    assert kv_cache_dtype("fp8", torch.float16) == FP8 and kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16


def attention_outputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, SlotKVCache]:
    """Prefill two chunks of one prompt (the second reading the first's K/V back from the cache), then decode one
    token: (prefill output, decode output, cache)."""
    torch.manual_seed(1)
    heads, dim, prompt = 2, 16, 12
    cache = SlotKVCache(1, 2, heads, dim, 32, dtype, torch.device("cpu"))
    q, k, v = (torch.randn(prompt + 1, heads, dim) for _ in range(3))
    chunks = [(1, 0, 5), (1, 5, 7)]
    outputs = []
    for slot, start, length in chunks:
        masks = [torch.arange(start + length)[None, :] <= torch.arange(start, start + length)[:, None]]
        attend = prefill_attention(cache, [(slot, start, length)], masks, gqa=False)
        outputs.append(attend(0, q[start:start + length], k[start:start + length], v[start:start + length]))
    attend = decode_attention(cache, torch.tensor([cache.scratch_position, prompt]), torch.tensor([1, prompt + 1]),
                              context=prompt + 1, fused=False)
    rows = slice(prompt, prompt + 1)
    decoded = attend(0, torch.cat([q[rows], q[rows]]), torch.cat([k[rows], k[rows]]), torch.cat([v[rows], v[rows]]))
    return torch.cat(outputs), decoded[1], cache


def test_an_fp8_kv_cache_stores_fp8_and_attends_close_to_the_dense_one() -> None:
    dense_prefill, dense_decode, _ = attention_outputs(torch.float32)
    fp8_prefill, fp8_decode, cache = attention_outputs(FP8)
    assert cache.keys[0].dtype == FP8 and cache.keys[0][1, :, :13].float().abs().sum() > 0
    assert relative_error(fp8_prefill, dense_prefill) < 0.05
    assert relative_error(fp8_decode, dense_decode) < 0.05
    # The first chunk attends to its own K/V exactly (not read back from fp8): identical to dense.
    assert torch.equal(fp8_prefill[:5], dense_prefill[:5])
    assert SlotKVCache.bytes_per_slot(2, 4, 16, 31, FP8) * 4 == SlotKVCache.bytes_per_slot(2, 4, 16, 31, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, FP8])
def test_a_packed_context_puts_each_chunks_cached_prefix_before_its_rows(dtype: torch.dtype) -> None:
    """What the GPU's variable-length prefill attends to: per chunk, its slot's cached prefix (read back from
    fp8) then its own rows, token-major and back to back."""
    from triton_vlm.engine.attention import _packed_context

    cache = SlotKVCache(1, 2, 3, 4, 16, dtype, torch.device("cpu")).keys[0]
    cache[1, :, :3] = to_storage(torch.randn(3, 3, 4), dtype)
    chunks = [(1, 3, 2), (0, 0, 4)]
    fresh = torch.randn(6, 3, 4)
    cache[1, :, 3:5] = to_storage(fresh[:2].transpose(0, 1), dtype)  # stored before attention, as prefill does
    cache[0, :, :4] = to_storage(fresh[2:].transpose(0, 1), dtype)
    packed = _packed_context(cache, fresh, chunks)
    prefix = cache[1, :, :3].transpose(0, 1).float()
    if dtype == FP8:  # the chunks' own rows stay exact; only the prefix comes back from fp8
        assert torch.equal(packed, torch.cat([prefix, fresh]))
    else:
        assert torch.equal(packed, torch.cat([prefix, cache[1, :, 3:5].transpose(0, 1), cache[0, :, :4].transpose(0, 1)]))
        assert torch.equal(packed[3:], fresh)


# -- the engine ---------------------------------------------------------------------------------------------------
PROMPTS = ["What is this?", "a photo of a cat sitting on a red mat next to a window. Describe it in detail.", "hi"]
IMAGES = [noise(40, 30, 0), noise(64, 64, 1), noise(17, 90, 2)]


def engine(loaded: tuple[Any, Any, Any], **config: Any) -> LLMEngine:
    family, model, processor = loaded
    return LLMEngine(family, model, processor, EngineConfig(max_model_len=256, **config))


def first_logits(engine: LLMEngine) -> torch.Tensor:
    """The logits after each prompt's prefill [prompts, vocab]."""
    requests = [engine.prepare(image, prompt, SamplingParams(max_tokens=1), lambda out: None)
                for image, prompt in zip(IMAGES, PROMPTS, strict=True)]
    embeds = engine.adapter.prompt_embeds(engine.model, engine.decoder, requests, engine.runner.encode_images)
    chunks = [(slot, 0, len(r.prompt_ids)) for slot, r in enumerate(requests)]
    with torch.inference_mode():
        return engine.decoder.logits(engine.decoder.prefill(torch.cat(embeds), chunks, engine.cache))


@pytest.fixture(scope="module")
def dense_logits() -> torch.Tensor:
    """A dense engine's first logits (its own model: quantizing frees the model's weights)."""
    return first_logits(engine(load_tiny("llava")))


@pytest.mark.parametrize("config", [{"kv_cache_dtype": "fp8"}, {"quantization": "fp8"},
                                    {"quantization": "fp8", "kv_cache_dtype": "fp8"}])
def test_fp8_engine_stays_close_to_the_dense_one(dense_logits: torch.Tensor, config: dict[str, str]) -> None:
    loaded = load_tiny("llava")
    fp8_engine = engine(loaded, **config)
    logits = first_logits(fp8_engine)
    assert F.cosine_similarity(logits, dense_logits, dim=-1).min() > 0.99
    assert relative_error(logits, dense_logits) < 0.1
    # Random tiny weights leave near-ties at the top: the dense choice is among fp8's first few, not always first.
    assert all(d in top for d, top in zip(dense_logits.argmax(-1).tolist(), logits.topk(5).indices.tolist(),
                                          strict=True))
    outputs = fp8_engine.generate([(image, prompt, SamplingParams(max_tokens=8, ignore_eos=True))
                                   for image, prompt in zip(IMAGES, PROMPTS, strict=True)])
    assert [len(tokens) for tokens in outputs] == [8, 8, 8]
    assert [tokens[0] for tokens in outputs] == logits.argmax(-1).tolist()


def layers_with_and_without_fp8_producers(monkeypatch: pytest.MonkeyPatch, rows: int, device: str = "cpu",
                                           dtype: Any = None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The tiny fp8 llava decoder's layers over ``rows`` rows (a stand-in for attention), with the RMSNorms and
    the SiLU gating making the projections' fp8 inputs and without: (both outputs, and the quantizing passes
    ``linear`` made of its own in each)."""
    decoder = engine(load_tiny("llava", device, dtype), quantization="fp8").decoder
    passes = []
    own_pass = quantization.quantize_rows
    monkeypatch.setattr(quantization, "quantize_rows", lambda x: passes.append(x.shape) or own_pass(x))
    h = torch.randn(rows, decoder.embed_tokens.weight.shape[1], generator=torch.Generator().manual_seed(rows))
    h = h.to(device=device, dtype=decoder.embed_tokens.weight.dtype)
    cos, sin = decoder._rope(h, torch.arange(rows, device=device))  # noqa: SLF001 (the layers alone)
    width = decoder.num_heads * decoder.head_dim

    def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q.reshape(rows, width)

    with torch.inference_mode():  # fresh copies of h: the fused RMSNorm adds into its residual in place
        fused = decoder._layers(h.clone(), cos, sin, attend)  # noqa: SLF001
        fused_passes = len(passes)
        monkeypatch.setattr(decoder, "fp8_inputs_from_producers", False)
        separate = decoder._layers(h.clone(), cos, sin, attend)  # noqa: SLF001
    return fused, separate, fused_passes, len(passes) - fused_passes


@pytest.mark.parametrize("rows", [WEIGHT_ONLY_MAX_ROWS, WEIGHT_ONLY_MAX_ROWS + 1])
def test_norm_and_gating_hand_fp8_projections_their_inputs_quantized(monkeypatch: pytest.MonkeyPatch,
                                                                      rows: int) -> None:
    """Above the weight-only band only attention's output takes a quantizing pass of linear's own: the RMSNorms
    and the SiLU gating make the other three projections' inputs fp8 themselves, with the same result (on the
    GPU by their kernels: tests/gpu)."""
    fused, separate, fused_passes, separate_passes = layers_with_and_without_fp8_producers(monkeypatch, rows)
    assert torch.equal(fused, separate)
    layers = len(load_tiny("llava")[1].model.language_model.layers)
    if rows <= WEIGHT_ONLY_MAX_ROWS:
        assert fused_passes == separate_passes == 0
    else:
        assert (fused_passes, separate_passes) == (layers, 4 * layers)  # o_proj's inputs alone, or all four


def test_quantizing_the_llama_decoder_frees_its_dense_weights() -> None:
    loaded = load_tiny("llava")
    language_model = loaded[1].model.language_model
    fp8_engine = engine(loaded, quantization="fp8")
    layer = fp8_engine.decoder.layers[0]
    assert all(isinstance(getattr(layer, name), Fp8Weight) for name in ("qkv", "o", "gate_up", "down"))
    assert language_model.layers[0].self_attn.q_proj.weight.numel() == 0
    assert language_model.layers[0].mlp.down_proj.weight.numel() == 0
    assert fp8_engine.decoder.lm_weight.dtype == torch.float32  # lm_head and embeddings stay dense


def test_decoders_without_fp8_weights_refuse_quantization() -> None:
    with pytest.raises(GenerationError, match="quantization=fp8: the engine's kosmos2 decoder keeps its weights"):
        engine(load_tiny("kosmos2"), quantization="fp8")


def test_gpus_without_fp8_tensor_cores_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(GenerationError, match="compute capability 8.9 or newer .* A100-SXM4-80GB is not one"):
        check_fp8_support(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_support(torch.device("cuda:0"))
    check_fp8_support(torch.device("cpu"))


def test_settings_turn_fp8_on_and_bad_values_are_refused() -> None:
    settings = read_settings("llava_stream", {"model_family": "llava", "base_model": "llava", "kv_cache_dtype": "fp8"},
                             env={"TRITON_VLM_LLAVA_STREAM_QUANTIZATION": "fp8"})
    config = settings.engine
    assert (config.quantization, config.kv_cache_dtype) == ("fp8", "fp8")
    assert (EngineConfig().quantization, EngineConfig().kv_cache_dtype) == ("none", "auto")
    with pytest.raises(InvalidInputError, match="quantization must be one of"):
        EngineConfig(quantization="int4")
    with pytest.raises(InvalidInputError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp16")
