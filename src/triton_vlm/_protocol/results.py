"""A response's outputs as a typed :class:`Output`, and the other answers read from Triton."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from triton_vlm._protocol.wire import Choice, TokenLogprob, decode_choices, decode_logprobs

#: The outputs every served model declares.
OUTPUTS = ("generated_text", "generated_tokens", "prompt_tokens", "finish_reason")
#: Optional output of grounding models (kosmos2): a JSON list of phrases with their boxes.
ENTITIES = "entities"
#: Output of the prompt positions the engine's prefix cache held (in the contract since it had a prefix cache).
CACHED_TOKENS = "cached_tokens"
#: Optional input of models with several skills (moondream2).
TASK = "task"
#: The decoupled companion that streams a public model's answers: ``<model>_stream``.
STREAM_SUFFIX = "_stream"


@dataclass(frozen=True)
class Output:
    """One response: a whole answer, or one piece of a stream (then ``text`` is the new text and the counts are
    totals so far)."""

    text: str
    generated_tokens: int
    prompt_tokens: int
    finish_reason: str  #: "" until the last piece of a stream
    #: The ``entities`` output (JSON) where the response has one (kosmos2's; a stream's last piece), else None.
    entities: str | None = None
    #: The generated tokens' logprobs where asked (of this piece's tokens, in a stream).
    logprobs: tuple[TokenLogprob, ...] = ()
    #: A whole answer's choices 1 to n-1 (``n`` > 1).
    choices: tuple[Choice, ...] = field(default_factory=tuple)
    #: Which choice a streamed piece belongs to (a stream of ``n`` choices interleaves their pieces).
    index: int = 0
    #: Prompt positions the engine's prefix cache held (choice 0's; 0 on the batched loop). Read from a response with
    #: a finish reason (a whole answer, a choice's last piece): streamed pieces before it do not carry it.
    cached_tokens: int = 0


def stream_model(model: str) -> str:
    """The streaming companion of ``model`` (a name that already is one stays as it is)."""
    return model if model.endswith(STREAM_SUFFIX) else f"{model}{STREAM_SUFFIX}"


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)  # str: a JSON (non-binary) answer


def _first(result: Any, name: str) -> Any:
    array = result.as_numpy(name)
    return None if array is None else array.reshape(-1)[0]


def parse_output(result: Any) -> Output:
    """An :class:`Output` from a tritonclient ``InferResult`` (HTTP or gRPC)."""
    entities = _first(result, ENTITIES)
    logprobs, choices, index = (_first(result, name) for name in ("token_logprobs", "choices", "index"))
    finish_reason = _text(_first(result, "finish_reason"))
    cached = _first(result, CACHED_TOKENS) if finish_reason else None  # a piece that ends nothing has none
    return Output(text=_text(_first(result, "generated_text")),
                  generated_tokens=int(_first(result, "generated_tokens")),
                  prompt_tokens=int(_first(result, "prompt_tokens")),
                  finish_reason=finish_reason,
                  entities=None if entities is None else _text(entities),
                  logprobs=decode_logprobs(None if logprobs is None else _text(logprobs)),
                  choices=decode_choices(None if choices is None else _text(choices)),
                  index=0 if index is None else int(index),
                  cached_tokens=0 if cached is None else int(cached))


def statistics_models(stats: Any) -> list[tuple[str, str]]:
    """``(name, version)`` of every loaded model from Triton's statistics (a gRPC message or HTTP JSON): the
    model list that needs no admin key."""
    if isinstance(stats, Mapping):
        return [(m["name"], m["version"]) for m in stats.get("model_stats", [])]
    return [(m.name, m.version) for m in stats.model_stats]
