"""triton_vlm.detokenizer: a stream's text a few tokens at a time, equal to the tokenizer's text for the whole list."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_vlm.detokenizer import REPLACEMENT, IncrementalDetokenizer

from .helpers import load_tiny

#: Text with spaces, punctuation and characters of two to four UTF-8 bytes (split over byte tokens where the
#: tiny tokenizers have no merge for them).
TEXTS = ["The quick brown fox jumps over the lazy dog, twice.", "café naïve — 日本語の文 🙂 done",
         " leading space and  double spaces ", "a" * 40]


def counting(decode: Callable[[list[int]], str]) -> tuple[Callable[[list[int]], str], list[int]]:
    """``decode`` that records how many tokens each call decoded."""
    sizes: list[int] = []

    def wrapped(ids: list[int]) -> str:
        sizes.append(len(ids))
        return decode(ids)
    return wrapped, sizes


@pytest.fixture(scope="module", params=["llava", "moondream2"])
def tokenizer(request: pytest.FixtureRequest) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, the family's detokenize) for a tiny checkpoint's tokenizer."""
    family, _model, processor = load_tiny(request.param)
    encode: Any = processor.tokenizer.encode
    if request.param == "llava":
        return (lambda text: encode(text, add_special_tokens=False)), lambda ids: family.detokenize(processor, ids)
    return encode, lambda ids: family.detokenize(processor, ids)


@settings(max_examples=40, deadline=None)
@given(text=st.sampled_from(TEXTS), steps=st.lists(st.integers(1, 4), min_size=1, max_size=200))
def test_the_text_is_the_whole_lists_text_after_every_update(tokenizer: Any, text: str, steps: list[int]) -> None:
    encode, decode = tokenizer
    ids = list(encode(text))
    detokenizer = IncrementalDetokenizer(decode)
    end = 0
    for step in steps:
        end = min(len(ids), end + step)
        whole = decode(ids[:end])
        got = detokenizer.update(ids[:end])
        if whole.endswith(REPLACEMENT):  # inside a character: what came before it, no more
            assert whole.startswith(got) and not got.endswith(REPLACEMENT)
        else:
            assert got == whole
    assert detokenizer.update(ids) == decode(ids)


def test_each_update_decodes_a_few_tokens_not_the_whole_answer(tokenizer: Any) -> None:
    encode, decode = tokenizer
    ids = list(encode(" ".join(TEXTS) * 8))
    spy, sizes = counting(decode)
    detokenizer = IncrementalDetokenizer(spy)
    for end in range(1, len(ids) + 1):
        detokenizer.update(ids[:end])
    assert detokenizer.text == decode(ids)
    assert len(ids) > 300 and sum(sizes) < 12 * len(ids)  # a whole decode per token would be ~len(ids)^2 / 2
    assert max(sizes) < len(ids) / 4


def utf8(ids: list[int]) -> str:
    """A byte-level tokenizer: each id is one byte."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_a_character_split_over_tokens_comes_out_whole() -> None:
    ids = list("é🙂".encode())  # 2 + 4 bytes
    detokenizer = IncrementalDetokenizer(utf8)
    assert [detokenizer.update(ids[:end]) for end in range(1, 7)] == ["", "é", "é", "é", "é", "é🙂"]


def test_bytes_that_are_no_text_give_what_the_tokenizer_gives() -> None:
    ids = [0x61, 0xFF, 0x62, 0xC3, 0x28, 0x63]  # a, an invalid byte, b, a broken two-byte sequence, (, c
    detokenizer = IncrementalDetokenizer(utf8)
    for end in range(1, len(ids) + 1):
        got = detokenizer.update(ids[:end])
        assert got == utf8(ids[:end]) or (utf8(ids[:end]).endswith(REPLACEMENT) and utf8(ids[:end]).startswith(got))
    assert detokenizer.text == "a\ufffdb\ufffd(c"
