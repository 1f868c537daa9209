"""The decoders' weights: fused projections that share storage with the model's own parameters.

Fusing q/k/v (and an MLP's gate/up) gives fewer, larger matmuls. The fused tensor becomes the only copy: the
original linears' weights turn into views of it, so the Hugging Face model keeps working and memory does not
double.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _point_into(linears: tuple[torch.nn.Linear, ...], fused: torch.Tensor) -> torch.Tensor:
    """Make each linear's weight a view of its rows of ``fused`` (no copy stays behind); returns ``fused``."""
    offset = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[offset:offset + rows]
        offset += rows
    return fused


def fuse_weights(*linears: torch.nn.Linear) -> torch.Tensor:
    """Concatenate the weights of ``linears``; the originals become views of the result."""
    return _point_into(linears, torch.cat([lin.weight.data for lin in linears], dim=0))


def fuse_biases(*linears: torch.nn.Linear) -> torch.Tensor | None:
    """The biases of ``linears`` concatenated like :func:`fuse_weights` (the originals become views of it); None
    where none has one. A linear without a bias among biased ones gets zeros."""
    if all(lin.bias is None for lin in linears):
        return None
    fused = torch.cat([lin.bias.data if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
                       for lin in linears])
    offset = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        if lin.bias is not None:
            lin.bias.data = fused[offset:offset + rows]
        offset += rows
    return fused


def _fastest_layout(weight: torch.Tensor, batches: tuple[int, ...] = (1, 64)) -> torch.Tensor:
    """``weight`` [out, in] stored either row-major or column-major, whichever cuBLAS multiplies faster at
    decode batch sizes (for some shapes the other layout picks a much better GEMV kernel). The result is a
    [out, in] tensor (possibly a transposed view) holding the only copy of the data."""
    if weight.device.type != "cuda":
        return weight
    candidates = [weight, weight.t().contiguous().t()]
    timings = []
    for candidate in candidates:
        inputs = [torch.randn(b, weight.shape[1], device=weight.device, dtype=weight.dtype) for b in batches]
        for x in inputs:
            F.linear(x, candidate)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            for x in inputs:
                F.linear(x, candidate)
        end.record()
        end.synchronize()
        timings.append(start.elapsed_time(end))
    return candidates[timings.index(min(timings))]


def relayout(linears: tuple[torch.nn.Linear, ...], fused: torch.Tensor) -> torch.Tensor:
    """``fused`` (the weight behind ``linears``) in :func:`_fastest_layout`; the linears point into the result."""
    best = _fastest_layout(fused)
    return best if best is fused else _point_into(linears, best)


def output_weight(lm_head: torch.nn.Linear, embeddings: torch.nn.Embedding) -> torch.Tensor:
    """``lm_head``'s weight in :func:`_fastest_layout` (at batch 64 one layout picked a 290 us GEMM, three times
    the bandwidth bound, for kosmos2's 65k-token vocabulary). A weight tied to the embeddings keeps its rows for
    them: the other layout then becomes a copy of its own."""
    weight = lm_head.weight.data
    if weight.data_ptr() == embeddings.weight.data_ptr():
        return _fastest_layout(weight)
    return relayout((lm_head,), weight)
