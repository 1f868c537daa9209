"""The way to Triton: asyncio gRPC (``tritonclient.grpc.aio``), one channel shared by every request.

Every answer of a model with a ``<model>_stream`` companion (the engine) comes from that companion over a gRPC
stream, whole answers too (one Triton pass, not the public forwarder and then the engine); models without one
(CPU hosts with ``--engine off``, ``add-model`` models) answer plain infer calls. The protocol (tensors, the
stream loop, errors as the project's exception tree) is :mod:`triton_vlm._protocol`'s, as the client's is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Any

from triton_vlm._protocol.connect import make_client
from triton_vlm._protocol.errors import is_restricted, translate
from triton_vlm._protocol.results import (
    CACHED_TOKENS,
    ENTITIES,
    OUTPUTS,
    STREAM_SUFFIX,
    TASK,
    Output,
    parse_output,
    statistics_models,
)
from triton_vlm._protocol.stream import StreamCall, outputs_async
from triton_vlm._protocol.tensors import RequestFields, request_inputs, requested_outputs
from triton_vlm._protocol.wire import Choice, TokenLogprob
from triton_vlm.errors import GenerationError, TritonVLMError

#: A request's sampling and output options: the :class:`RequestFields` the front reads from the body
#: (``max_tokens`` ... ``repetition_penalty``, ``task``, ``response_format``); each call adds the chat's ``messages``
#: and ``images`` and ``stream``. One list of fields for both, in ``_protocol``.
Sampling = RequestFields


@dataclass(frozen=True)
class ChatInput:
    """A chat request's inputs: the ``messages`` JSON (:mod:`triton_vlm.chat`) and each image's file bytes."""

    messages: str
    images: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Piece:
    """A whole answer, or one piece of a stream (``text`` is then the new text; counts are totals so far)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "" until the last piece of a stream
    #: kosmos2's ``entities`` output, decoded (a list of phrase/span/boxes dicts); None where not asked for.
    entities: list[dict[str, Any]] | None = None
    #: This piece's tokens' logprobs (where asked for).
    logprobs: tuple[TokenLogprob, ...] = ()
    #: A whole answer's choices 1 to n-1 (``n`` > 1).
    choices: tuple[Choice, ...] = ()
    #: The choice a streamed piece belongs to (``n`` > 1: the choices' pieces come interleaved).
    index: int = 0
    #: Prompt positions the engine's prefix cache held (on a choice's last piece, and a whole answer).
    cached_tokens: int = 0


@dataclass(frozen=True)
class ServedModel:
    name: str
    streams: bool  # has a ready <name>_stream companion
    entities: bool = False  # has the optional ``entities`` output (grounding)
    tasks: bool = False  # takes the optional ``task`` input (several skills)
    cached_tokens: bool = False  # has the ``cached_tokens`` output (prefix cache hits)


class TritonGateway:
    """Talks to one Triton over gRPC. Create and use it inside one running event loop."""

    def __init__(self, url: str, *, timeout_s: float = 600.0, index_ttl_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.index_ttl_s = index_ttl_s
        self._client: Any = None
        self._index: dict[str, ServedModel] | None = None
        self._index_at = 0.0
        self._index_lock: asyncio.Lock | None = None
        #: Input and output names of each READY model, from its metadata; dropped when the model leaves READY,
        #: so a reloaded model is read again.
        self._tensors: dict[str, tuple[frozenset[str], frozenset[str]]] = {}

    def _grpc(self) -> Any:
        if self._client is None:
            self._client = make_client("grpc.aio", self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    # -- state --------------------------------------------------------------------------------------------
    async def ready(self) -> bool:
        try:
            return bool(await self._grpc().is_server_ready(client_timeout=3))
        except Exception:
            return False

    async def models(self, refresh: bool = False) -> dict[str, ServedModel]:
        """The public models Triton serves (READY), by name; ``<m>_stream`` companions are not listed but
        mark ``m`` as streaming. Cached for ``index_ttl_s``."""
        if self._index_lock is None:
            self._index_lock = asyncio.Lock()
        async with self._index_lock:
            now = time.monotonic()
            if refresh or self._index is None or now - self._index_at > self.index_ttl_s:
                names, ready = await self._served_names()
                public = sorted(n for n in ready
                                if not (n.endswith(STREAM_SUFFIX) and n[:-len(STREAM_SUFFIX)] in names))
                self._tensors = {n: t for n, t in self._tensors.items() if n in ready}
                index = {}
                for name in public:
                    inputs, outputs = await self._tensor_names(name)
                    index[name] = ServedModel(name, f"{name}{STREAM_SUFFIX}" in ready, entities=ENTITIES in outputs,
                                              tasks=TASK in inputs, cached_tokens=CACHED_TOKENS in outputs)
                self._index = index
                self._index_at = now
            return self._index

    async def _served_names(self) -> tuple[set[str], set[str]]:
        """All model names and the READY ones: from the repository index, or where the launcher keeps it behind
        its admin key, from the statistics API and each model's readiness."""
        grpc = self._grpc()
        try:
            index = await grpc.get_model_repository_index(client_timeout=10)
            return {m.name for m in index.models}, {m.name for m in index.models if m.state == "READY"}
        except Exception as exc:
            if not is_restricted(exc):
                raise self._error(exc, None) from None
        try:
            names = {name for name, _ in statistics_models(await grpc.get_inference_statistics(client_timeout=10))}
            ready = {name for name in names if await grpc.is_model_ready(name, client_timeout=10)}
        except Exception as exc:
            raise self._error(exc, None) from None
        return names, ready

    async def _tensor_names(self, model: str) -> tuple[frozenset[str], frozenset[str]]:
        """The model's input and output names (cached). Unreadable metadata counts as no optional tensors: the
        model is still listed and answers text."""
        if model not in self._tensors:
            try:
                metadata = await self._grpc().get_model_metadata(model, client_timeout=10)
            except Exception:
                return frozenset(), frozenset()
            self._tensors[model] = (frozenset(t.name for t in metadata.inputs),
                                    frozenset(t.name for t in metadata.outputs))
        return self._tensors[model]

    # -- inference ----------------------------------------------------------------------------------------
    async def infer(self, model: str, chat: ChatInput, sampling: Sampling, *, entities: bool = False) -> Piece:
        """The whole answer; ``entities``: also ask for the ``entities`` output (only models that have it).

        From ``<model>_stream`` where the index says the model has one (a stream with one response), else from
        ``model`` itself."""
        served = (self._index or {}).get(model)
        if served is not None and served.streams:
            call = self._call(f"{model}{STREAM_SUFFIX}", chat, sampling, stream=False, entities=entities)
            outputs = [output async for output in self._stream(call)]  # one; a request without is an error
            return _piece(outputs[-1], entities=entities)
        call = self._call(model, chat, sampling, stream=None, entities=entities)
        try:
            result = await self._grpc().infer(call.model, call.inputs, outputs=call.outputs,
                                              client_timeout=self.timeout_s)
        except Exception as exc:
            raise self._error(exc, model) from None
        return _piece(parse_output(result), entities=entities)

    async def stream(self, model: str, chat: ChatInput, sampling: Sampling, *,
                     entities: bool = False) -> AsyncGenerator[Piece, None]:
        """Pieces of the answer as ``<model>_stream`` generates them; the last has a finish reason (and, with
        ``entities``, the model's ``entities`` output). With ``n`` > 1 the choices' pieces come interleaved, each
        with its ``index``, each choice's last with its finish reason. Closing the iterator early cancels the
        request in Triton."""
        call = self._call(f"{model}{STREAM_SUFFIX}", chat, sampling, stream=True, entities=entities)
        outputs = self._stream(call)
        try:
            async for output in outputs:
                # Only the final response carries the entities.
                yield _piece(output, entities=entities and bool(output.finish_reason))
        finally:
            await outputs.aclose()  # now, where the caller left early: that cancels the request

    def _call(self, model: str, chat: ChatInput, sampling: Sampling, *, stream: bool | None,
              entities: bool) -> StreamCall:
        fields = replace(sampling, messages=chat.messages, images=chat.images, stream=stream)
        n = sampling.n or 1
        served = (self._index or {}).get(model.removesuffix(STREAM_SUFFIX))
        # Asked for by name: ``entities`` and ``cached_tokens`` only where the model's metadata lists them (Triton
        # refuses a request for an output the model does not have), the sampling outputs only where the request
        # needs them.
        outputs = requested_outputs("grpc.aio", (*OUTPUTS, *([ENTITIES] if entities else []),
                                                 *([CACHED_TOKENS] if served is not None and served.cached_tokens
                                                   else []),
                                                 *(["token_logprobs"] if sampling.logprobs else []),
                                                 *(["choices", "index"] if n > 1 else [])))
        return StreamCall(model, request_inputs("grpc.aio", fields), outputs, choices=n)

    async def _stream(self, call: StreamCall) -> AsyncGenerator[Output, None]:
        outputs = outputs_async(self._grpc(), call, url=self.url, timeout=self.timeout_s)
        try:
            async for output in outputs:
                yield output
        except Exception as exc:
            raise self._error(exc, call.model) from None
        finally:
            await outputs.aclose()

    # -- errors -------------------------------------------------------------------------------------------
    def _error(self, exc: BaseException, model: str | None) -> TritonVLMError:
        """Any failure on the way to Triton as the project's error (a bug too: the answer is then a 500)."""
        error = translate(exc, model=model, url=self.url, timeout=self.timeout_s)
        return error if error is not None else GenerationError(f"{type(exc).__name__}: {exc}", model=model)


def _piece(output: Output, *, entities: bool = False) -> Piece:
    return Piece(text=output.text, prompt_tokens=output.prompt_tokens, completion_tokens=output.generated_tokens,
                 finish_reason=output.finish_reason, entities=_entities(output) if entities else None,
                 logprobs=output.logprobs, choices=output.choices, index=output.index,
                 cached_tokens=output.cached_tokens)


def _entities(output: Output) -> list[dict[str, Any]]:
    """The ``entities`` output as checked plain dicts (the shape :func:`~triton_vlm.client.entities.parse_entities`
    reads); a missing or malformed one is a server-side fault, not the caller's."""
    from triton_vlm.client.entities import parse_entities

    if output.entities is None:
        raise GenerationError("the model did not return its entities output")
    try:
        parsed = parse_entities(output.entities)
    except TritonVLMError as exc:
        raise GenerationError(f"the model's entities output is malformed: {exc}") from None
    return [entity_dict(e) for e in parsed]


def entity_dict(entity: Any) -> dict[str, Any]:
    """An :class:`~triton_vlm.client.entities.Entity` as the API's JSON (``span`` a 2-list or null)."""
    def boxes(items: Any) -> list[dict[str, float]]:
        return [{"x_min": b.x_min, "y_min": b.y_min, "x_max": b.x_max, "y_max": b.y_max} for b in items]

    return {"phrase": entity.phrase, "span": list(entity.span) if entity.span is not None else None,
            "boxes": boxes(entity.boxes), "boxes_px": boxes(entity.boxes_px)}
