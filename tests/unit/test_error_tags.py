"""triton_vlm.error_tags: Triton error codes carried inside messages (decoupled streams, BLS)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triton_vlm.error_tags import CODES, split_error_tag, tag_error
from triton_vlm.errors import (GenerationError, InvalidInputError, ModelLoadError, ModelUnavailableError,
                               TritonVLMError, UnknownModelError)


@pytest.mark.parametrize("code", CODES)
def test_tag_split_round_trip(code: str) -> None:
    message = "image: corrupt or truncated GIF data (index out of range)"
    tagged = tag_error(code, message)
    assert tagged == f"{code}: {message}"
    assert split_error_tag(tagged) == (code, message)


@pytest.mark.parametrize("error", [InvalidInputError("x"), ModelUnavailableError("x"), ModelLoadError("x"),
                                   UnknownModelError("x"), GenerationError("x")])
def test_every_project_error_code_can_be_tagged(error: TritonVLMError) -> None:
    assert error.triton_code in CODES
    assert split_error_tag(tag_error(error.triton_code, str(error))) == (error.triton_code, "x")


@pytest.mark.parametrize("message", [
    "generation failed: RuntimeError: boom",  # untagged
    "invalid_arg: lower case is no tag",
    "INVALID_ARG:no space after the colon",
    "FORBIDDEN: not one of the codes",
    " INVALID_ARG: leading space",
    "",
])
def test_untagged_messages_are_internal(message: str) -> None:
    assert split_error_tag(message) == ("INTERNAL", message)


def test_only_the_first_tag_is_taken_and_multiline_messages_survive() -> None:
    assert split_error_tag("UNAVAILABLE: NOT_FOUND: nested") == ("UNAVAILABLE", "NOT_FOUND: nested")
    assert split_error_tag("INVALID_ARG: line one\nline two") == ("INVALID_ARG", "line one\nline two")
    assert split_error_tag("CANCELLED: ") == ("CANCELLED", "")


@given(st.sampled_from(CODES), st.text(max_size=40))
def test_round_trip_property(code: str, message: str) -> None:
    assert split_error_tag(tag_error(code, message)) == (code, message)
