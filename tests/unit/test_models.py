"""triton_vlm.models and triton_vlm.errors: the family registry, adapters' prompts, the error tree."""

from __future__ import annotations

import copy

import pytest

from triton_vlm.errors import (
    GenerationError,
    InvalidInputError,
    ModelLoadError,
    ModelUnavailableError,
    ServerUnreachableError,
    TritonVLMError,
    UnknownModelError,
)
from triton_vlm.models import ModelFamily, available_families, get_family
from triton_vlm.models.base import cache_kwarg
from triton_vlm.models.llava import IMAGE_TOKEN, LlavaFamily


def test_registry() -> None:
    assert available_families() == ["auto", "kosmos2", "llava", "llava_next", "llava_onevision", "moondream2",
                                   "qwen2_vl", "smolvlm"]
    for name in available_families():
        family = get_family(name)
        assert isinstance(family, ModelFamily) and family.name == name
        assert get_family(name) is family  # one adapter instance per family
    # Every registered family is served (moondream2 natively since its merge).
    assert all(get_family(name).supported for name in available_families())


def test_unknown_family_lists_known_ones() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_family("blip2")
    assert str(info.value) == ("unknown model family 'blip2'; known families: auto, kosmos2, llava, llava_next, "
                               "llava_onevision, moondream2, qwen2_vl, smolvlm")
    assert isinstance(info.value, KeyError)


def test_default_model_ids() -> None:
    assert get_family("llava").default_hf_model_id == "llava-hf/llava-1.5-7b-hf"
    assert get_family("kosmos2").default_hf_model_id == "microsoft/kosmos-2-patch14-224"
    assert get_family("moondream2").default_hf_model_id == "vikhyatk/moondream2"
    assert get_family("qwen2_vl").default_hf_model_id == "Qwen/Qwen2-VL-7B-Instruct"


def test_moondream2_is_native() -> None:
    from triton_vlm.models.moondream2.model import Moondream2Model

    family = get_family("moondream2")
    assert family.model_class() is Moondream2Model  # no transformers remote code
    with pytest.raises(InvalidInputError, match="reserved token"):
        family.validate_prompt("hi <|endoftext|>")


def test_llava_prompt_without_chat_template(llava_runtime) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint saved without a chat template still gets LLaVA-1.5's format (the family's fallback)."""
    processor = copy.copy(llava_runtime.ensure_loaded().processor)
    processor.chat_template = None
    assert LlavaFamily().render_prompt(processor, "What?") == f"USER: {IMAGE_TOKEN}\nWhat? ASSISTANT:"


def test_kosmos2_prompt_is_the_user_text(kosmos2_runtime) -> None:  # type: ignore[no-untyped-def]
    loaded = kosmos2_runtime.ensure_loaded()
    assert loaded.family.render_prompt(loaded.processor, "<grounding> An image of") == "<grounding> An image of"
    assert loaded.family.first_position(loaded.model) == loaded.model.config.text_config.pad_token_id + 1


def test_validate_prompt_allows_ordinary_text() -> None:
    get_family("llava").validate_prompt("an <img> tag and image words")
    with pytest.raises(InvalidInputError, match="'<image>'"):
        get_family("llava").validate_prompt("x<image>y")


def test_cache_kwarg() -> None:
    def new(input_ids, cache=None): ...  # noqa: ANN001, ANN202, E704
    def old(input_ids, past_key_values=None): ...  # noqa: ANN001, ANN202, E704
    assert cache_kwarg(new) == "cache" and cache_kwarg(old) == "past_key_values"


@pytest.mark.parametrize("error, code, bases", [
    (InvalidInputError("x"), "INVALID_ARG", (ValueError,)),
    (ModelUnavailableError("x"), "UNAVAILABLE", ()),
    (ModelLoadError("x"), "UNAVAILABLE", (ModelUnavailableError,)),
    (UnknownModelError("x"), "NOT_FOUND", (KeyError,)),
    (GenerationError("x"), "INTERNAL", ()),
    (ServerUnreachableError("x"), "UNAVAILABLE", ()),
])
def test_error_tree(error: TritonVLMError, code: str, bases: tuple[type, ...]) -> None:
    assert isinstance(error, TritonVLMError) and error.triton_code == code
    assert all(isinstance(error, b) for b in bases)


def test_unknown_model_error_is_not_quoted() -> None:
    assert str(UnknownModelError("model 'x' missing")) == "model 'x' missing"
    assert str(UnknownModelError()) == ""
