"""triton_vlm.detokenizer: a stream's text a few tokens at a time, equal to the tokenizer's text for the whole list."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_vlm.detokenizer import REPLACEMENT, IncrementalDetokenizer, held_token_ids

from .helpers import counting, load_tiny

#: Text with spaces, punctuation and characters of two to four UTF-8 bytes (split over byte tokens where the
#: tiny tokenizers have no merge for them).
TEXTS = ["The quick brown fox jumps over the lazy dog, twice.", "café naïve — 日本語の文 🙂 done",
         " leading space and  double spaces ", "a" * 40]


def streamed(detokenizer: IncrementalDetokenizer, ids: list[int], whole: str) -> str:
    """What a stream of ``ids`` (one token an update) sends, joined: every text that grew the stream, then the
    rest of ``whole`` at the end, as the response loop's final flush does."""
    sent = ""
    for end in range(1, len(ids) + 1):
        text = detokenizer.update(ids[:end])
        assert text.startswith(sent), f"after {end} tokens {text!r} takes back the {sent!r} already streamed"
        sent = text
    return sent + whole[len(sent):]


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


# -- the families' tokenizers, whose decode is not always the decode of the tokens before plus the new ones ----
#: The tiny smolvlm's greedy answer to the sample image ("What is this?", 12 tokens). Its tokenizer falls back to
#: byte tokens (<0x75>, ...), and decodes each run of them as one piece: UTF-8 text, or one U+FFFD per byte where
#: the run is no UTF-8. So <0x75> alone reads "u", but <0x75> <0xA0> reads "\ufffd\ufffd".
SMOLVLM_ANSWER = [240, 401, 424, 575, 139, 553, 120, 163, 120, 213, 227, 540]
FAMILIES = ["llava", "kosmos2", "moondream2", "qwen2_vl", "smolvlm"]


def waiting_ids(tokenizer: Any, decode: Callable[[list[int]], str]) -> list[int]:
    """The ids whose text waits for the tokens after them, found from the tokens (not with the code under test):
    fallback byte tokens ("<0x75>", decoded with the byte tokens that follow) and tokens with no text of their own
    (the special ones a decode skips, which do not end such a run). Moondream2's plain ``tokenizers.Tokenizer``
    has no byte tokens."""
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return []
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [i for i, token in enumerate(tokens) if re.fullmatch(r"<0x[0-9A-F]{2}>", token) or not decode([i])]


@pytest.fixture(scope="module", params=FAMILIES)
def family_tokenizer(request: pytest.FixtureRequest) -> tuple[Callable[[list[int]], str], Any, list[int]]:
    """(the family's detokenize, its tokenizer, :func:`waiting_ids`) of a tiny checkpoint."""
    family, _model, processor = load_tiny(request.param)
    def decode(ids: list[int]) -> str:
        return str(family.detokenize(processor, ids))
    return decode, processor.tokenizer, waiting_ids(processor.tokenizer, decode)


def test_the_smolvlm_answer_streams_what_the_whole_decode_gives() -> None:
    family, _model, processor = load_tiny("smolvlm")
    tokenizer = processor.tokenizer
    whole = tokenizer.decode(SMOLVLM_ANSWER, skip_special_tokens=True)
    assert tokenizer.decode(SMOLVLM_ANSWER[:7]).endswith("u") and "u" not in whole  # the premise
    detokenizer = IncrementalDetokenizer(lambda ids: family.detokenize(processor, ids), held_token_ids(tokenizer))
    assert streamed(detokenizer, SMOLVLM_ANSWER, whole) == whole
    assert detokenizer.text == whole  # the last token is a word: nothing held back
    assert detokenizer.update(SMOLVLM_ANSWER[:4]) == whole  # an older list changes nothing


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_ids_stream_what_the_whole_list_decodes_to(family_tokenizer: Any, data: st.DataObject) -> None:
    """Any ids (byte tokens, special ones, ...): the text never takes back what it gave, it is the whole list's
    text at every step where that text is final (and with what is pending, at every step), and the stream joins
    to the whole decode."""
    decode, tokenizer, waiting = family_tokenizer
    one_id = st.integers(0, len(tokenizer) - 1)
    if waiting:  # runs of bytes and specials are where the tokenizers differ from a plain concatenation
        one_id = st.one_of(one_id, st.sampled_from(waiting))
    ids = data.draw(st.lists(one_id, min_size=1, max_size=40))
    detokenizer = IncrementalDetokenizer(decode, held_token_ids(tokenizer))
    sent = ""
    for end in range(1, len(ids) + 1):
        whole = decode(ids[:end])
        got = detokenizer.update(ids[:end])
        assert got.startswith(sent) and whole.startswith(got)
        if not (ids[end - 1] in waiting or whole.endswith(REPLACEMENT)):
            assert got == whole
        assert got + detokenizer.pending(ids[:end]) == whole  # what stop strings are looked for in
        sent = got
    whole = decode(ids)
    assert streamed(IncrementalDetokenizer(decode, held_token_ids(tokenizer)), ids, whole) == whole
