"""Model families: one adapter class per architecture, found through :mod:`triton_vlm.models.registry`."""

from triton_vlm.models.base import ModelFamily
from triton_vlm.models.registry import available_families, get_family

__all__ = ["ModelFamily", "available_families", "get_family"]
