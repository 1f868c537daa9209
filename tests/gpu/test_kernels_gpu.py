"""The fused kernels compiled for the GPU against their torch twins, in the engine's dtypes (the interpreter
runs the same checks on CPU: tests/unit/test_engine_kernels.py)."""

from __future__ import annotations

import pytest
import torch
from tests.unit.kernel_checks import kernel_errors

#: On an H100 (2026-11-26) the largest errors were 9.5e-7 in float32 and 2.0e-3 in float16 (one unit in the last
#: place of outputs up to ~4). float32 dots multiply in IEEE float32, as torch's float32 matmuls do: in TF32 (Triton's
#: default) decode attention was off by 1.8e-3.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_compiled_kernels_match_their_torch_twins(dtype: torch.dtype) -> None:
    errors = kernel_errors("cuda", dtype)
    assert len(errors) == 26
    for name, error in errors.items():
        assert error < TOLERANCE[dtype], f"{name}: max abs error {error}"


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("rows", [1, 16, 17, 48, 64, 65, 300])
def test_fp8_projections_follow_their_twin_at_every_size(rows: int, layout: str) -> None:
    """Each size band of ``quantization.linear`` (weight-only kernel, fp8 kernel, ``_scaled_mm``), with weights in
    either layout ``weights.relayout`` may leave (a column-major one once reached the kernels transposed)."""
    import torch.nn.functional as F

    from triton_vlm.engine.quantization import WEIGHT_ONLY_MAX_ROWS, Fp8Weight, linear, quantize_rows

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    generator = torch.Generator(device="cuda").manual_seed(rows)
    weight = torch.randn(96, 256, device="cuda", dtype=torch.float16, generator=generator)
    if layout == "column-major":
        weight = weight.t().contiguous().t()
    x = torch.randn(rows, 256, device="cuda", dtype=torch.float16, generator=generator)
    quantized = Fp8Weight.quantize(weight)
    dense = quantized.dequantize().float()
    if rows <= WEIGHT_ONLY_MAX_ROWS:  # inputs as they are
        twin = x.float() @ dense.t()
    else:  # inputs per-row fp8
        values, scales = quantize_rows(x)
        twin = (values.float() * scales) @ dense.t()
    out = linear(x, quantized)
    assert out.shape == (rows, 96) and out.dtype == torch.float16
    # float16 outputs: a few units in the last place of values up to ~60.
    assert (out.float() - twin).abs().max().item() / twin.abs().max().item() < 2e-3
    assert (F.linear(x, weight).float() - out.float()).norm() / twin.norm() < 0.1  # and near the dense product


@pytest.mark.parametrize("rows", [17, 64, 300])
def test_fp8_inputs_from_the_norm_and_gating_kernels_change_nothing(monkeypatch: pytest.MonkeyPatch,
                                                                    rows: int) -> None:
    """The fused RMSNorm and SiLU gating with fp8 outputs against the plain kernels and a quantizing pass, through
    the tiny llava decoder's layers in float16 (decode batches of 17-64 rows, and prefill). These gave the same
    bits on an H100 and an H200; at llava's sizes a few one-step fp8 roundings per million values came out
    (bench/results/h200-fp8-producers.json: the RMSNorm's float16 output can come out an ulp apart), so only that
    is allowed."""
    from tests.unit.test_engine_fp8 import layers_with_and_without_fp8_producers

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    fused, separate, fused_passes, separate_passes = layers_with_and_without_fp8_producers(
        monkeypatch, rows, "cuda", torch.float16)
    assert fused.dtype == torch.float16 and fused_passes < separate_passes
    assert ((fused.float() - separate.float()).norm() / separate.float().norm()).item() < 1e-3


#: Ada's shared memory a block (L4, L40S, RTX 4090: compute capability 8.9), as Triton reports it there.
ADA_SHARED_MEMORY = 101376

ON_ADA_LIMITS = """
import sys
import torch
from triton.runtime import driver
real = driver.active.utils.get_device_properties
driver.active.utils.get_device_properties = lambda device: {**real(device), "max_shared_mem": int(sys.argv[1])}
from triton_vlm.engine.quantization import Fp8Weight, linear
for outs, inner in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]:  # llava-7b's projections
    weight = Fp8Weight.quantize(torch.randn(outs, inner, device="cuda", dtype=torch.float16) * 0.02)
    for rows in (1, 16, 17, 32, 64):
        linear(torch.randn(rows, inner, device="cuda", dtype=torch.float16), weight)
torch.cuda.synchronize()
print("ok")
"""


def test_fp8_decode_matmuls_fit_adas_shared_memory() -> None:
    """Tiles tuned on an H100 (up to 192 KB of shared memory for 6 pipeline stages) must still launch where a
    block gets 99 KB: Triton refuses such a kernel at its first launch. A fresh process that Triton believes is an
    Ada GPU runs llava's four projections at each decode size band."""
    import subprocess
    import sys

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    result = subprocess.run([sys.executable, "-c", ON_ADA_LIMITS, str(ADA_SHARED_MEMORY)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.parametrize("window", [None, 8, 16])
def test_windowed_flash_prefill_and_decode_kernel_follow_dense_attention(monkeypatch: pytest.MonkeyPatch,
                                                                         window: int | None) -> None:
    """Mistral's sliding window on the fused paths: the variable-length flash prefill (``window_size_left``) over
    fresh and continued chunks of two slots, then the decode kernel (a start offset per row), in float16 against
    dense attention over each query's last ``window`` positions (tests/unit/test_engine_sliding_window.py runs the
    torch paths through the same steps)."""
    from tests.unit.test_engine_sliding_window import PROMPTS, STEPS, windowed_run

    from triton_vlm.engine import attention

    flash = attention._FLASH_VARLEN  # noqa: SLF001 (which call the prefill makes is what the test is about)
    calls: list[dict[str, int]] = []

    def recording(*args: object, **kwargs: int) -> object:
        calls.append(kwargs)
        return flash(*args, **kwargs)

    monkeypatch.setattr(attention, "_FLASH_VARLEN", recording)
    got, expected = windowed_run(window, "cuda", torch.float16, fused=True)
    assert len(calls) == len(STEPS)  # one flash call a step (one layer)
    assert all(kw.get("window_size_left") == (None if window is None else window - 1) for kw in calls)
    for slot in PROMPTS:
        torch.testing.assert_close(got[slot], expected[slot], atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float8_e4m3fn], ids=["fp16", "fp8"])
def test_slotted_decode_attention_kernel_follows_its_twin(kv_dtype: torch.dtype) -> None:
    """Rows naming their slots (a prompt chunk run as rows: several rows of one slot, growing lengths) read those
    slots in the kernel as in the torch twin; without slots the kernel is the one every decode step runs."""
    from triton_vlm.engine import kernels

    generator = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn(8, 8, 512, 128, device="cuda", generator=generator, dtype=torch.float16).to(kv_dtype)
    values = torch.randn(8, 8, 512, 128, device="cuda", generator=generator, dtype=torch.float16).to(kv_dtype)
    q = torch.randn(20, 32, 128, device="cuda", generator=generator, dtype=torch.float16)
    slots = torch.tensor([5] * 16 + [0, 1, 2, 7], device="cuda")
    lengths = torch.tensor([*range(300, 316), 1, 40, 511, 128], device="cuda")
    got = kernels.decode_attention(q, keys, values, lengths, slots=slots)
    expected = kernels.decode_attention_torch(q, keys, values, lengths, 512, slots=slots)
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=5e-3)
