"""Text of a growing list of generated tokens, decoding only a few tokens per update.

Decoding the whole answer again for every streamed delta costs O(n) per delta, O(n^2) per answer: for a
2048-token answer that was ~0.6 s of tokenizer time on the thread that sends responses, at every concurrent
stream (bench/results/cpu-detokenize.json). Here each update decodes two short windows: the tokens since the previous update,
once with and once without the few tokens before them as context, and appends the difference. The context
keeps what depends on neighbours right (SentencePiece's leading spaces). A window that ends inside a character
(a trailing U+FFFD) waits for the next token; one that would not simply extend the text (bytes that are no UTF-8
at all) decodes the whole list instead, so the text is always what the tokenizer gives for the whole list.
vLLM and TGI detokenize streams with the same windows.
"""

from __future__ import annotations

from collections.abc import Callable

#: What an incomplete UTF-8 sequence decodes to.
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """``update(ids)`` with the whole (growing) token list returns its text so far: ``decode(ids)``, where
    ``decode`` maps token ids to text as the tokenizer does, held back while it ends inside a character."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.text = ""
        self._prefix = 0  # tokens [prefix, read) are the context of the next window
        self._read = 0  # ``text`` is decode(ids[:read])

    def update(self, ids: list[int]) -> str:
        if len(ids) <= self._read:
            return self.text
        before = self._decode(ids[self._prefix:self._read])
        after = self._decode(ids[self._prefix:])
        if after.endswith(REPLACEMENT):
            return self.text  # inside a character: the next token may complete it
        new = after[len(before):]
        if after.startswith(before) and REPLACEMENT not in new:
            self.text += new
        else:  # bytes that are no text at all, or a window that changed its context: decode the whole list
            self.text = self._decode(ids)
        self._prefix, self._read = self._read, len(ids)
        return self.text
