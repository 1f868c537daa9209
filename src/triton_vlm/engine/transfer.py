"""Host-to-device index tensors that do not stall the stream."""

from __future__ import annotations

import torch


def device_longs(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as a long tensor on ``device``. On GPU the copy goes through pinned memory, asynchronously:
    ``torch.tensor(values, device=...)`` would wait for all work queued before it (a host sync per call)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)
