"""Structured output: OpenAI's ``response_format`` as a grammar (xgrammar) that masks each row's logits.

A request's format is parsed once (:meth:`ResponseFormat.parse`: ``{"type": "json_object"}`` or
``{"type": "json_schema", "json_schema": {"schema": {...}}}``), compiled against the family's tokenizer by a
:class:`Grammars` (one per tokenizer, compiled grammars kept in a bounded LRU by the format's hash), and followed
token by token by a :class:`GrammarState` per sequence. :func:`mask_logits` is the one batched hook both decode
loops call between the logits and the sampler: a token the grammar forbids gets ``-inf``, and the end-of-sequence
tokens are allowed only where the grammar accepts, so an answer that ends on EOS always parses; one cut by
``max_tokens`` ends with ``finish_reason`` "length".
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from triton_vlm.errors import InvalidInputError

if TYPE_CHECKING:
    import xgrammar as xgr

PARAM = "response_format"
#: Compiled grammars kept per tokenizer (least recently used dropped first).
GRAMMAR_CACHE_SIZE = 64


@dataclass(frozen=True)
class ResponseFormat:
    """A validated ``response_format``: ``kind`` "json_object" or "json_schema" (``schema`` its JSON text)."""

    kind: str
    schema: str | None = None

    @property
    def key(self) -> str:
        """The cache key: a hash of the kind and the schema's canonical JSON."""
        return hashlib.sha256(f"{self.kind}\0{self.schema or ''}".encode()).hexdigest()

    @classmethod
    def parse(cls, text: str | bytes | None) -> ResponseFormat | None:
        """OpenAI's ``response_format`` object as JSON text; None for none or ``{"type": "text"}``. Raises
        :class:`InvalidInputError` (param ``response_format``) for anything else."""
        if text is None:
            return None
        try:
            value = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"{PARAM}: not JSON ({exc})", param=PARAM) from exc
        if not isinstance(value, dict):
            raise InvalidInputError(f"{PARAM}: expected an object with a 'type'", param=PARAM)
        kind = value.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object")
        if kind != "json_schema":
            raise InvalidInputError(f"{PARAM}: type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                                    param=PARAM)
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidInputError(f"{PARAM}: json_schema.schema must be a JSON Schema object", param=PARAM)
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))


class Grammars:
    """Compiles formats for one tokenizer (thread-safe); ``stop_token_ids`` end an answer the grammar accepts."""

    def __init__(self, tokenizer: Any, stop_token_ids: Iterable[int]) -> None:
        # Imported on first use: parsing a format (the OpenAI front, validation) needs no grammar library.
        import xgrammar as xgr

        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._compiled: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, fmt: ResponseFormat) -> xgr.CompiledGrammar:
        """The grammar of ``fmt`` (cached); a schema xgrammar cannot compile is an INVALID_ARG on ``response_format``."""
        with self._lock:
            if (hit := self._compiled.get(fmt.key)) is not None:
                self._compiled.move_to_end(fmt.key)
                return hit
        try:
            if fmt.kind == "json_object":
                compiled = self._compiler.compile_builtin_json_grammar()
            else:
                # Compact JSON (no free whitespace): a model cannot pad an answer with blanks until max_tokens.
                compiled = self._compiler.compile_json_schema(fmt.schema or "{}", any_whitespace=False,
                                                              strict_mode=True)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError for schemas it cannot take
            raise InvalidInputError(f"{PARAM}: the JSON schema cannot be compiled ({exc})", param=PARAM) from exc
        with self._lock:
            self._compiled[fmt.key] = compiled
            while len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._compiled)


_by_tokenizer: weakref.WeakKeyDictionary[Any, dict[frozenset[int], Grammars]] = weakref.WeakKeyDictionary()
_by_tokenizer_lock = threading.Lock()


def grammars_for(tokenizer: Any, stop_token_ids: Iterable[int]) -> Grammars:
    """The :class:`Grammars` of ``tokenizer`` (built once per tokenizer object and stop set)."""
    stops = frozenset(stop_token_ids)
    with _by_tokenizer_lock:
        per_stop = _by_tokenizer.setdefault(tokenizer, {})
        if stops not in per_stop:
            per_stop[stops] = Grammars(tokenizer, stops)
        return per_stop[stops]


class GrammarState:
    """Where one sequence stands in its grammar; advanced with every token it keeps."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size: int = compiled.tokenizer_info.vocab_size

    def accept(self, token: int) -> None:
        """Advance past ``token`` (which the mask allowed)."""
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"token {token} is not allowed by the response_format grammar")

    @property
    def terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


def mask_logits(logits: torch.Tensor, states: Sequence[GrammarState | None]) -> None:
    """Forbid (``-inf``), in place, every token of each row of ``logits`` [rows, vocab] that its grammar does not
    allow next; rows without a state are left alone. Token ids past the tokenizer's vocabulary (a padded output
    layer) are forbidden in constrained rows too."""
    rows = [i for i, state in enumerate(states) if state is not None]
    if not rows:
        return
    import xgrammar as xgr

    vocab = max(state.vocab_size for state in states if state is not None)
    bitmask = xgr.allocate_token_bitmask(len(states), vocab)
    for row in rows:
        state = states[row]
        assert state is not None
        state.fill(bitmask, row)
        if state.vocab_size < logits.shape[-1]:
            logits[row, state.vocab_size:] = float("-inf")
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
