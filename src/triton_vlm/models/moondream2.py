"""moondream2: not served yet. Its native implementation arrives with the "Model coverage" issue.

The model directory exists so the repository layout is complete, but requests get a clear UNAVAILABLE error
instead of a pretend answer, and the launcher leaves it out unless asked for by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from triton_vlm.errors import ModelLoadError
from triton_vlm.models.base import ModelFamily

NOT_YET = ("moondream2 is not supported yet: its native (no trust_remote_code) implementation is tracked in "
           "the issue 'Model coverage'. Serve llava or kosmos2 meanwhile.")


class Moondream2Family(ModelFamily):
    name = "moondream2"
    default_hf_model_id = "vikhyatk/moondream2"
    supported = False

    def model_class(self) -> type:
        raise ModelLoadError(NOT_YET)

    def render_prompt(self, processor: Any, prompt: str) -> str:
        raise ModelLoadError(NOT_YET)

    def build_tiny(self, path: Path) -> None:
        raise ModelLoadError(NOT_YET)
