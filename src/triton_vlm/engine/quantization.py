"""fp8 (e4m3) storage for the engine: weights of the decoders' projections and the KV cache, both opt-in.

Weights (``quantization: fp8``), as vLLM's online fp8 does for an fp16 checkpoint: each projection's weight is
quantized once at load, one scale per output channel. Prefill and large decode batches quantize their inputs
per row (token) on the fly and ``torch._scaled_mm`` multiplies on the tensor cores' fp8 path; small decode
batches multiply their inputs as they are by the widened weight (a kernel that only streams the weight). A
decode step then reads half the weight bytes, and prefill's matmuls run at fp8 rate.

KV cache (``kv_cache_dtype: fp8``): K and V are stored as e4m3 with no scale (as vLLM's uncalibrated fp8
cache), saturating at +-448; attention reads them back to the model's dtype. A decode step at 64 running
requests reads more KV than weights (llava: ~22 GB against 13.5), so this halves its larger part.

Both change the outputs slightly (greedy tokens can part from fp16's at near-ties); the default is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

import torch
import torch.nn.functional as F

from triton_vlm.engine import kernels
from triton_vlm.errors import GenerationError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype for an ``EngineConfig.kv_cache_dtype`` value ("auto" or "fp8")."""
    return FP8 if name == "fp8" else model_dtype


def check_fp8_support(device: torch.device) -> None:
    """Refuse fp8 on GPUs without fp8 tensor cores (before Ada/Hopper, compute capability 8.9): their kernels
    would fail at the first request, not at load. CPUs run the torch twins."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise GenerationError(f"fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); {name} is not one: "
                              "set quantization=none and kv_cache_dtype=auto")


def to_storage(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as ``dtype`` for storing; fp8 saturates at +-448 (whether a plain cast does, or makes NaN, has
    depended on the torch version and device)."""
    if x.dtype == dtype:
        return x
    if dtype == FP8:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


@dataclass(frozen=True)
class Fp8Weight:
    """A projection's [out, in] weight as e4m3 with one float32 scale per output channel."""

    #: [in, out], column-major (the transpose of a row-major [out, in]): the layout ``_scaled_mm`` takes.
    data: torch.Tensor
    #: [1, out] float32: weight row j is ``data[:, j] * scale[0, j]``.
    scale: torch.Tensor
    #: The dtype of the products (the model's).
    out_dtype: torch.dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Fp8Weight:
        data, scale = _quantize_rows_torch(weight)  # a weight's rows are its output channels
        return cls(data=data.t(), scale=scale.t().contiguous(), out_dtype=weight.dtype)

    def dequantize(self) -> torch.Tensor:
        """The [out, in] weight this stands for, in ``out_dtype`` (for tests and checks)."""
        return (self.data.float() * self.scale).t().to(self.out_dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4


@dataclass(frozen=True)
class Fp8Rows:
    """A projection's input already per-row fp8, as :func:`quantize_rows` gives it: made so by the kernel that
    computes it (the RMSNorm or the SiLU gating before the projection) rather than by a pass of its own."""

    #: [rows, cols] e4m3.
    values: torch.Tensor
    #: [rows, 1] float32: row i is ``values[i] * scales[i]``.
    scales: torch.Tensor


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [rows, cols] as e4m3 with one float32 scale per row: (values [rows, cols], scales [rows, 1]).
    One fused kernel on GPU; the torch twin defines the result."""
    if kernels.fused_available(x.device):
        return kernels.quantize_rows_fp8(x, FP8, FP8_MAX)
    return _quantize_rows_torch(x)


def _quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` in torch: each row's absolute max maps to 448. The values come out row-major, as
    the kernel's do, whatever ``x``'s layout (the engine's weights may be column-major, weights.relayout; the fp8
    matmuls need row-major)."""
    rows = x.float()
    scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return to_storage(rows / scale, FP8).contiguous(), scale


#: How an fp8 projection multiplies, by rows (bench/results/h100-fp8-gemm-variants.txt, llava's shapes on an
#: H100, per layer, input quantization included):
#: - up to WEIGHT_ONLY_MAX_ROWS (decode steps of a few requests): inputs stay in the model's dtype and a kernel
#:   streams the fp8 weight, widening it (80 us at 1 row, 82 at 16; ``_scaled_mm`` 122);
#: - up to FP8_KERNEL_MAX_ROWS: inputs quantized per row, an fp8 x fp8 Triton kernel with the weight's channels on
#:   the tensor cores' wide side (97 us at 32 rows, 102 at 64; ``_scaled_mm`` 122, the weight-only kernel 110-123);
#: - above (prefill, large batches): inputs quantized per row, ``torch._scaled_mm``.
#: Where inputs are quantized, the RMSNorm and SiLU-gating kernels emit them as fp8 themselves (:class:`Fp8Rows`);
#: only attention's output takes a pass of its own.
WEIGHT_ONLY_MAX_ROWS = 16
FP8_KERNEL_MAX_ROWS = 64


def takes_fp8_rows(weight: torch.Tensor | Fp8Weight, rows: int) -> TypeGuard[Fp8Weight]:
    """Whether :func:`linear` quantizes an input of ``rows`` rows per row for ``weight``: where it does, the
    input's producer may hand it over as :class:`Fp8Rows` instead."""
    return isinstance(weight, Fp8Weight) and rows > WEIGHT_ONLY_MAX_ROWS


def linear(x: torch.Tensor | Fp8Rows, weight: torch.Tensor | Fp8Weight) -> torch.Tensor:
    """``x @ weight.T`` for a dense weight or an :class:`Fp8Weight` (``x`` [tokens, in], or already quantized
    where :func:`takes_fp8_rows` says so)."""
    if isinstance(x, Fp8Rows):
        if not takes_fp8_rows(weight, x.values.shape[0]):
            raise TypeError("linear: Fp8Rows go only to fp8 weights, above WEIGHT_ONLY_MAX_ROWS rows")
        values, scales = x.values, x.scales
    elif isinstance(weight, torch.Tensor):
        return F.linear(x, weight)
    elif x.shape[0] <= WEIGHT_ONLY_MAX_ROWS:
        if kernels.fused_available(x.device):
            return kernels.fp8_weight_matmul(x.contiguous(), weight.data.t(), weight.scale[0])
        return F.linear(x, weight.dequantize())
    else:
        values, scales = quantize_rows(x.contiguous())
    if kernels.fused_available(values.device) and values.shape[0] <= FP8_KERNEL_MAX_ROWS:
        return kernels.fp8_matmul(values, scales[:, 0], weight.data.t(), weight.scale[0], weight.out_dtype)
    return torch._scaled_mm(values, weight.data, scale_a=scales, scale_b=weight.scale, out_dtype=weight.out_dtype)
