"""Maps a family name to its adapter class, importing the module only when first asked for; and a checkpoint's
architecture (its config.json's ``architectures``) to the family that serves it."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from triton_vlm.errors import UnknownModelError
from triton_vlm.models.base import LazyClass, ModelFamily, import_class

# name -> (module, class). Adding a family is one line here and one package, models/<family>/.
_FAMILIES: dict[str, LazyClass] = {
    "llava": ("triton_vlm.models.llava", "LlavaFamily"),
    "llava_next": ("triton_vlm.models.llava_next", "LlavaNextFamily"),
    "llava_onevision": ("triton_vlm.models.llava_onevision", "LlavaOnevisionFamily"),
    "kosmos2": ("triton_vlm.models.kosmos2", "Kosmos2Family"),
    "moondream2": ("triton_vlm.models.moondream2", "Moondream2Family"),
    # Qwen2-VL and Qwen2.5-VL (the tiny variant qwen2_5_vl stands in for a Qwen2.5-VL id).
    "qwen2_vl": ("triton_vlm.models.qwen2_vl", "Qwen2VLFamily"),
    "smolvlm": ("triton_vlm.models.smolvlm", "SmolVLMFamily"),
    # Any AutoModelForImageTextToText checkpoint with a chat template (triton-vlm add-model).
    "auto": ("triton_vlm.models.auto", "AutoFamily"),
}


def available_families() -> list[str]:
    return sorted(_FAMILIES)


@cache
def get_family(name: str) -> ModelFamily:
    """The adapter instance for ``name``; raises :class:`UnknownModelError` listing the known ones."""
    try:
        entry = _FAMILIES[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model family {name!r}; known families: {', '.join(available_families())}"
        ) from None
    family = import_class(entry)()
    assert isinstance(family, ModelFamily)
    return family


def architecture_families() -> dict[str, str]:
    """Architecture name (``LlavaForConditionalGeneration``) -> the family that serves it, from each servable
    family's :attr:`~ModelFamily.architectures`.

    The names stay on the families (a new family declares its own; nothing to add here), so this imports every
    family's package: its ``family.py`` and what that imports (torch, which ``triton_vlm.models`` imports anyway),
    never transformers' model classes or the engine (engine adapters stay lazy); tests/unit/test_checkpoint.py
    checks that. Raises where two families claim one architecture, which would make the pick arbitrary."""
    found: dict[str, str] = {}
    for name in available_families():
        family = get_family(name)
        if not family.supported:
            continue
        for architecture in family.architectures:
            if architecture in found:
                raise ValueError(f"architecture {architecture!r} is claimed by two families, {found[architecture]!r} "
                                 f"and {name!r}; remove it from one of them")
            found[architecture] = name
    return found


def family_for_architectures(architectures: Sequence[str]) -> str | None:
    """The family serving the first of a checkpoint's ``architectures`` that one serves; None where none does
    (the ``auto`` family may still serve it, by name: it claims no architecture)."""
    table = architecture_families()
    return next((table[a] for a in architectures if a in table), None)
