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
    assert len(errors) == 20
    for name, error in errors.items():
        assert error < TOLERANCE[dtype], f"{name}: max abs error {error}"
