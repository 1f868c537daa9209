"""Text of a growing list of generated tokens, decoding only a few tokens per update.

Decoding the whole answer again for every streamed delta costs O(n) per delta, O(n^2) per answer: for a
2048-token answer that was ~0.6 s of tokenizer time on the thread that sends responses, at every concurrent
stream (bench/results/cpu-detokenize.json). Here each update decodes two short windows: the tokens since the previous update,
once with and once without the few tokens before them as context, and appends the difference. The context
keeps what depends on neighbours right (SentencePiece's leading spaces). A window that ends inside a character
(a trailing U+FFFD) waits for the next token; one that would not simply extend the text (bytes that are no UTF-8
at all) decodes the whole list instead, so the text is always what the tokenizer gives for the whole list.
vLLM and TGI detokenize streams with the same windows.

Some text is not final even when it ends with a whole character. A tokenizer with byte fallback (Llama's,
SentencePiece ones: ``<0x75>`` tokens) decodes each run of byte tokens as one piece: its UTF-8 text, or one U+FFFD
per byte where the run is no UTF-8. ``<0x75>`` alone reads "u", ``<0x75> <0xA0>`` reads two U+FFFD. Special
tokens are skipped before that, so they do not end a run (and a window of only skipped tokens is no context:
SentencePiece strips the leading space of the first token it sees). Such tokens are *held*
(:func:`held_token_ids`): a window ends at the last token that is not held, so a stream never sends text that a
later token takes back. Byte-level BPE (GPT-2's, Qwen2's) has no byte tokens: its broken bytes decode the same
whatever follows, but for a trailing incomplete character.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

#: What an incomplete UTF-8 sequence decodes to.
REPLACEMENT = "\ufffd"

#: A byte-fallback tokenizer's byte token: ``<0x00>`` to ``<0xFF>``.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


#: held_token_ids' answers by tokenizer object (reading a vocabulary of 150k tokens takes ~0.2 s: once per tokenizer,
#: not per batch).
_held_by_tokenizer: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()
_held_lock = threading.Lock()


def held_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids whose text may change with the tokens after them: a transformers tokenizer's byte-fallback tokens
    and its special tokens (those a decode skips). Empty for a tokenizer without ``get_vocab`` (a plain
    byte-level one, moondream2's), and holding a token that needs no holding only delays its text. Read once per
    tokenizer object."""
    with _held_lock:
        try:
            return _held_by_tokenizer[tokenizer]
        except (KeyError, TypeError):  # not yet, or an object that takes no weak reference (then never kept)
            pass
    held = _read_held_token_ids(tokenizer)
    with _held_lock, contextlib.suppress(TypeError):
        _held_by_tokenizer[tokenizer] = held
    return held


def _read_held_token_ids(tokenizer: Any) -> frozenset[int]:
    if not hasattr(tokenizer, "get_vocab"):
        return frozenset()
    held = {token_id for token, token_id in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(token)}
    held.update(getattr(tokenizer, "all_special_ids", ()))
    added: dict[int, Any] = getattr(tokenizer, "added_tokens_decoder", {})
    held.update(token_id for token_id, token in added.items() if getattr(token, "special", False))
    return frozenset(held)


class IncrementalDetokenizer:
    """``update(ids)`` with the whole (growing) token list returns its text so far: ``decode(ids)``, where
    ``decode`` maps token ids to text as the tokenizer does, held back while it ends inside a character or with
    ``held`` tokens (:func:`held_token_ids`), whose text the tokens after them may change. What it returned once
    is the start of every later text."""

    def __init__(self, decode: Callable[[list[int]], str], held: Iterable[int] = ()) -> None:
        self._decode = decode
        self._held = frozenset(held)
        self.text = ""
        self._prefix = 0  # tokens [prefix, read) are the context of the next window
        self._read = 0  # ``text`` is decode(ids[:read]); ids[read - 1] is no held token
        self._seen = 0  # tokens [read, seen) were looked at: ...
        self._final = 0  # ... and ids[:final] ends with a token that is not held (read when none did)

    def update(self, ids: list[int]) -> str:
        if len(ids) <= self._read:
            return self.text
        self._final = max(self._final, self._read)
        for i in range(max(self._seen, self._read), len(ids)):  # each token once, even in a long run of bytes
            if ids[i] not in self._held:
                self._final = i + 1
        self._seen = len(ids)
        end = self._final
        if end <= self._read:
            return self.text  # only held tokens since the last text: wait for one that ends their run
        before = self._decode(ids[self._prefix:self._read])
        after = self._decode(ids[self._prefix:end])
        if after.endswith(REPLACEMENT):
            return self.text  # inside a character: the next token may complete it
        new = after[len(before):]
        if after.startswith(before) and REPLACEMENT not in new:
            self.text += new
        else:  # bytes that are no text at all, or a window that changed its context: decode the whole list
            self.text = self._decode(ids[:end])
        self._prefix, self._read = self._read, end
        return self.text

    def pending(self, ids: list[int]) -> str:
        """What the tokens of ``ids`` (as last given to :meth:`update`) add after :attr:`text` for now: the text of
        trailing held tokens and of an incomplete character (U+FFFD), which later tokens may change. ``text +
        pending(ids)`` is ``decode(ids)``; "" where ``text`` is all of it (no decoding then)."""
        if len(ids) <= self._read:
            return ""
        before = self._decode(ids[self._prefix:self._read])
        after = self._decode(ids[self._prefix:])
        if after.startswith(before):
            return after[len(before):]
        return self._decode(ids)[len(self.text):]  # a window that changed its context (as in update)
