"""The ``auto`` family: any ``AutoModelForImageTextToText`` checkpoint with a chat template, served by the
batched loop alone (:mod:`.family`; no engine adapter yet)."""

from triton_vlm.models.auto.family import AutoFamily

__all__ = ["AutoFamily"]
