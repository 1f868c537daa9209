"""triton_vlm.engine.kernels: the torch twins match transformers' Llama modules and plain attention; the fused
kernels (GPU-only in the engine) match the twins under Triton's interpreter."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from triton_vlm.engine import kernels

TOLERANCE = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rms_norm_matches_llama_rms_norm(dtype: torch.dtype, eps: float) -> None:
    hidden = 48
    norm = LlamaRMSNorm(hidden, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(randn(hidden, seed=1) + 1.0)
    norm = norm.to(dtype)
    x = randn(7, hidden, dtype=dtype, seed=2) * 3
    expected = norm(x)
    out = kernels.rms_norm_torch(x, norm.weight, eps)
    assert out.dtype == expected.dtype and out.shape == x.shape
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    # Not a no-op: the rows really are normalized.
    assert not torch.allclose(out.float(), x.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_apply_rotary_pos_emb(dtype: torch.dtype) -> None:
    tokens, heads, kv_heads, head_dim = 9, 4, 2, 16
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 2, 3, 17, 40, 41, 100, 255])
    q = randn(tokens, heads, head_dim, dtype=dtype, seed=3)
    k = randn(tokens, kv_heads, head_dim, dtype=dtype, seed=4)
    cos, sin = rotary(q, positions[None, :])  # [1, tokens, head_dim]
    # transformers' layout: [batch, heads, tokens, head_dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cos_t, sin_t = cos[0][:, None, :], sin[0][:, None, :]  # the engine's [tokens, 1, head_dim]
    torch.testing.assert_close(kernels.rope_torch(q, cos_t, sin_t), q_hf[0].transpose(0, 1), **TOLERANCE[dtype])
    torch.testing.assert_close(kernels.rope_torch(k, cos_t, sin_t), k_hf[0].transpose(0, 1), **TOLERANCE[dtype])
    # Position 0 is the identity rotation; later positions really rotate.
    torch.testing.assert_close(kernels.rope_torch(q, cos_t, sin_t)[0], q[0])
    assert not torch.allclose(kernels.rope_torch(q, cos_t, sin_t)[5].float(), q[5].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_silu_gate_times_up(dtype: torch.dtype) -> None:
    gate = randn(5, 24, dtype=dtype, seed=5)
    up = randn(5, 24, dtype=dtype, seed=6)
    out = kernels.silu_mul_torch(torch.cat([gate, up], dim=-1))
    assert out.shape == (5, 24)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, **TOLERANCE[dtype])
    torch.testing.assert_close(out.float(), (gate.float() * torch.sigmoid(gate.float()) * up.float()),
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


def test_fused_kernels_are_gpu_only() -> None:
    assert kernels.fused_available(torch.device("cpu")) is False
    # On a CUDA device they depend on Triton being importable; never on a CPU tensor.
    assert kernels.fused_available(torch.device("cuda")) is (kernels.triton is not None)


class _Launches:
    """Stands in for a Triton kernel: records each launch's keyword arguments (tiles, stages) and runs nothing."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __getitem__(self, grid: tuple[int, ...]):  # type: ignore[no-untyped-def]
        return lambda *args, **kwargs: self.calls.append({"grid": grid, **kwargs})


HOPPER, ADA = (132, 232448), (142, 101376)  # SMs and shared memory a block, as Triton reports them


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
@pytest.mark.parametrize("device, expected", [
    # (kernel, out, rows): stages. Few output tiles (o, down) pipeline deeper where shared memory allows.
    (HOPPER, {("fp8", 4096, 64): 6, ("fp8", 12288, 64): 3, ("fp8", 4096, 17): 6,
              ("weight", 4096, 1): 4, ("weight", 12288, 1): 3}),
    (ADA, {("fp8", 4096, 64): 3, ("fp8", 12288, 64): 3, ("fp8", 4096, 17): 4,
           ("weight", 4096, 1): 3, ("weight", 12288, 1): 3}),
], ids=["hopper", "ada"])
def test_fp8_decode_matmuls_pipeline_as_deep_as_shared_memory_allows(
        monkeypatch: pytest.MonkeyPatch, device: tuple[int, int], expected: dict) -> None:
    from triton_vlm.engine.quantization import FP8

    limits = kernels.DeviceLimits(*device)
    monkeypatch.setattr(kernels, "_device_limits", lambda _: limits)
    launches = {"fp8": _Launches(), "weight": _Launches()}
    monkeypatch.setattr(kernels, "_fp8_matmul_kernel", launches["fp8"])
    monkeypatch.setattr(kernels, "_fp8_weight_matmul_kernel", launches["weight"])
    for (kind, outs, rows), stages in expected.items():
        weight = torch.zeros(outs, 64, dtype=FP8)
        if kind == "fp8":
            kernels.fp8_matmul(torch.zeros(rows, 64, dtype=FP8), torch.ones(rows), weight, torch.ones(outs),
                               torch.float16)
            launch = launches[kind].calls[-1]
            stage_bytes = (launch["BLOCK_N"] + launch["ROWS"]) * launch["BLOCK_K"]
        else:
            kernels.fp8_weight_matmul(torch.zeros(rows, 64, dtype=torch.float16), weight, torch.ones(outs))
            launch = launches[kind].calls[-1]
            stage_bytes = (launch["BLOCK_N"] + 2 * launch["ROWS"]) * launch["BLOCK_K"]
        assert launch["num_stages"] == stages, (kind, outs, rows)
        assert launch["num_stages"] * stage_bytes <= limits.shared_memory


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_decode_attention_torch_is_each_rows_softmax_over_its_own_length(heads: int, kv_heads: int) -> None:
    batch, positions, dim = 4, 40, 16
    q = randn(batch, heads, dim, seed=7)
    keys = randn(batch + 1, kv_heads, positions, dim, seed=8)  # one slot more than rows: never read
    values = randn(batch + 1, kv_heads, positions, dim, seed=9)
    lengths = torch.tensor([1, 7, 40, 23])
    out = kernels.decode_attention_torch(q, keys, values, lengths)
    assert out.shape == (batch, heads * dim)
    for row in range(batch):
        n = int(lengths[row])
        for head in range(heads):
            kv = head // (heads // kv_heads)
            weights = torch.softmax(keys[row, kv, :n] @ q[row, head] / dim ** 0.5, dim=0)
            torch.testing.assert_close(out[row, head * dim:(head + 1) * dim], weights @ values[row, kv, :n])
    # An explicit context bound gives the same; positions past a row's length never count.
    torch.testing.assert_close(kernels.decode_attention_torch(q, keys, values, lengths, context=40), out)
    poisoned = keys.clone()
    poisoned[0, :, 1:] = 1e4
    torch.testing.assert_close(kernels.decode_attention_torch(q, poisoned, values, lengths)[0], out[0])


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="Triton (a test dependency) has wheels for Linux x86-64 only")
def test_fused_kernels_match_their_torch_twins_in_the_triton_interpreter() -> None:
    # A fresh process: the interpreter is chosen when the kernels are defined.
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("kernel_checks.py"))], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 26
    for name, error in errors.items():
        assert error < 1e-5, f"{name}: max abs error {error}"


def test_engine_keeps_sdpa_off_cudnn_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN's SDPA plans per shape (36 ms per new prompt length on an H100): the engine turns it off on CUDA."""
    from triton_vlm.engine.attention import avoid_per_shape_attention_plans

    calls: list[bool] = []
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: not calls)
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    avoid_per_shape_attention_plans(torch.device("cpu"))
    assert calls == []
    avoid_per_shape_attention_plans(torch.device("cuda", 0))
    avoid_per_shape_attention_plans(torch.device("cuda", 0))  # already off: nothing to do
    assert calls == [False]


def test_prefill_takes_variable_length_flash_attention_only_where_flash_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton_vlm.engine.attention import flash_varlen_available

    assert not flash_varlen_available(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert not flash_varlen_available(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert flash_varlen_available(torch.device("cuda:0"))
