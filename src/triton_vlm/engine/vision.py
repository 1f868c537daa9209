"""The vision tower as CUDA graphs at small batches.

A ViT at batch 1 to 16 is bound by kernel launches, not by the GPU: CLIP-L/336 takes 9.1 ms for one image and
9.7 ms for eight on an H100 (timed at commit f0a8f2a by a phase probe since deleted), nearly all of it the host
queuing ~400 kernels. That is first-token latency at low load, and at high load the decode graphs idle behind it
each time a few requests are admitted. Families whose pixels all reach the tower at one shape (llava's and kosmos2's images, moondream2's
crops) replay a graph per batch bucket instead; a larger batch (compute-bound anyway) and any tower that fails to
capture run eagerly. On the GPU, CLIP-style towers also get their quick_gelu as one kernel (:func:`fuse_quick_gelu`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from triton_vlm.engine import kernels

log = logging.getLogger("triton_vlm")

Encode = Callable[[torch.Tensor], torch.Tensor]
VISION_BUCKETS = (1, 2, 4, 8, 16)


class GraphedVision:
    """``encode(pixels [n, *image_shape]) -> features [n, ...]`` replayed from a graph of the next bucket up
    (rows past ``n`` hold stale pixels: images do not see each other in a vision tower)."""

    def __init__(self, encode: Encode, image_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 buckets: tuple[int, ...] = VISION_BUCKETS) -> None:
        self.encode = encode
        self.buckets = buckets
        self._pixels = torch.zeros((buckets[-1], *image_shape), dtype=dtype, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.eager = False  # set for good when a capture fails

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        count = pixels.shape[0]
        bucket = next((b for b in self.buckets if b >= count), None)
        if bucket is None or self.eager or pixels.shape[1:] != self._pixels.shape[1:] or not self._ready(bucket):
            return self.encode(pixels)  # too many images, no graphs, or another shape than the model's own
        graph, features = self._graphs[bucket]
        self._pixels[:count].copy_(pixels)
        graph.replay()
        # A copy: the next replay overwrites the graph's output, and callers may keep what they got.
        return features[:count].clone()

    def warmup(self) -> None:
        for bucket in self.buckets:
            if not self._ready(bucket):
                break

    def _ready(self, bucket: int) -> bool:
        if bucket not in self._graphs:
            try:
                self._graphs[bucket] = self._capture(bucket)
            except Exception as exc:  # a tower with a host sync or a dynamic shape: eager from now on
                log.warning("vision tower: CUDA graph capture failed (%s: %s); it runs eagerly",
                            type(exc).__name__, exc)
                self.eager = True
                return False
        return True

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        pixels = self._pixels[:bucket]
        side = torch.cuda.Stream(pixels.device)
        side.wait_stream(torch.cuda.current_stream(pixels.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.encode(pixels)
        torch.cuda.current_stream(pixels.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            features = self.encode(pixels)
        log.debug("captured vision graph batch=%d", bucket)
        return graph, features


class FusedQuickGELU(torch.nn.Module):
    """transformers' ``QuickGELUActivation`` as one fused pass where the kernels run (its torch twin elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quick_gelu(x) if kernels.fused_available(x.device) else kernels.quick_gelu_torch(x)


def fuse_quick_gelu(model: torch.nn.Module) -> int:
    """Put :class:`FusedQuickGELU` in place of every ``QuickGELUActivation`` in ``model`` (CLIP-style towers:
    llava's, kosmos2's); returns how many. The model is changed in place, for every later caller too."""
    from transformers.activations import QuickGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuickGELUActivation):
                setattr(parent, name, FusedQuickGELU())
                swapped += 1
    return swapped
