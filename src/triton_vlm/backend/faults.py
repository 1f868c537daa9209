"""Test-only fault injection for the backend models. Off unless ``TRITON_VLM_INJECT_FAULTS`` is set; never set it
in production.

``TRITON_VLM_INJECT_FAULTS="<point>=<marker>[,<point>=<marker>...]"``: a request whose prompt contains ``<marker>``
raises ``RuntimeError("CUDA out of memory ...")`` (what PyTorch raises when the GPU is full) at ``<point>``:

- ``parse``: once its inputs are validated, in its own work (the batched models' execute, the engine service of a
  ``<model>_stream`` model);
- ``prepare``: where the engine's processor tokenizes it (``<model>_stream`` models only).

``tests/integration/test_faults.py`` uses it against the real server: the failing request gets its error, the
others of its batch their answers, and the model stays READY.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

ENV = "TRITON_VLM_INJECT_FAULTS"
POINTS = ("parse", "prepare")


@dataclass(frozen=True)
class FaultInjection:
    """Which marker (in a prompt) raises at which point; empty: no faults (the default)."""

    markers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultInjection:
        """Read :data:`ENV`; a malformed value raises ``ValueError`` naming it (the model then fails its load)."""
        markers: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in environ.get(ENV, "").split(","))):
            point, _, marker = item.partition("=")
            if point.strip() not in POINTS or not marker.strip():
                raise ValueError(f"{ENV}: expected <point>=<marker> with a point in {POINTS}, got {item!r}")
            markers[point.strip()] = marker.strip()
        return cls(markers)

    def check(self, point: str, prompt: str) -> None:
        """Raise the injected fault if ``prompt`` carries the marker of ``point``."""
        marker = self.markers.get(point)
        if marker is not None and marker in prompt:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB (fault injected at {point!r} by "
                               f"{ENV})")
