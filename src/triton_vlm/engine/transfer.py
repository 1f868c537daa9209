"""Host-to-device copies that do not stall the stream."""

from __future__ import annotations

import torch


def device_longs(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as a long tensor on ``device``. On GPU the copy goes through pinned memory, asynchronously:
    ``torch.tensor(values, device=...)`` would wait for all work queued before it (a host sync per call)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def device_pixels(pixels: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Requests' pixel tensors, concatenated, on ``device`` as ``dtype``; on GPU through pinned memory,
    asynchronously (a pageable copy would wait for the decode step already queued)."""
    return device_copy(torch.cat(pixels), device, dtype)


def device_copy(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on ``device`` (as ``dtype``); on GPU through pinned memory, asynchronously."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype, non_blocking=True)
