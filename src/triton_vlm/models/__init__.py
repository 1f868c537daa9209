"""Model families: one package per family (``models/<family>/``: its :class:`ModelFamily`, and where the engine
serves it, its engine adapter and decoder pieces), found through :mod:`triton_vlm.models.registry`; the batched
loop every family runs through is :mod:`triton_vlm.models.generation`."""

from triton_vlm.models.base import ModelFamily
from triton_vlm.models.registry import available_families, get_family

__all__ = ["ModelFamily", "available_families", "get_family"]
