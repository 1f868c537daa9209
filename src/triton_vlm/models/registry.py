"""Maps a family name to its adapter class, importing the module only when first asked for."""

from __future__ import annotations

from functools import cache

from triton_vlm.errors import UnknownModelError
from triton_vlm.models.base import LazyClass, ModelFamily, import_class

# name -> (module, class). Adding a family is one line here and one package, models/<family>/.
_FAMILIES: dict[str, LazyClass] = {
    "llava": ("triton_vlm.models.llava", "LlavaFamily"),
    "llava_next": ("triton_vlm.models.llava_next", "LlavaNextFamily"),
    "kosmos2": ("triton_vlm.models.kosmos2", "Kosmos2Family"),
    "moondream2": ("triton_vlm.models.moondream2", "Moondream2Family"),
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
