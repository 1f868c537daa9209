"""The way to Triton: asyncio gRPC (``tritonclient.grpc.aio``), one channel shared by every request.

Whole answers come from ``<model>``; token streams from ``<model>_stream`` (gRPC bidirectional streaming to a
decoupled model). Errors come back as the project's exception tree (:mod:`triton_vlm.errors`), read the same
way :class:`~triton_vlm.client.TritonVLMClient` reads them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from triton_vlm.errors import GenerationError, ServerUnreachableError, TritonVLMError
from triton_vlm.openai.errors import TritonTimeoutError

STREAM_SUFFIX = "_stream"
OUTPUTS = ("generated_text", "generated_tokens", "prompt_tokens", "finish_reason")
#: Optional output of grounding models (kosmos2): JSON list of phrases with their boxes. Asked for only where the
#: model's metadata lists it (Triton refuses a request for an output the model does not have).
ENTITIES = "entities"
#: Optional input of models with several skills (moondream2).
TASK = "task"


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    task: str | None = None


@dataclass(frozen=True)
class Piece:
    """A whole answer, or one piece of a stream (``text`` is then the new text; counts are totals so far)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "" until the last piece of a stream
    #: kosmos2's ``entities`` output, decoded (a list of phrase/span/boxes dicts); None where not asked for.
    entities: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class ServedModel:
    name: str
    streams: bool  # has a ready <name>_stream companion
    entities: bool = False  # has the optional ``entities`` output (grounding)
    tasks: bool = False  # takes the optional ``task`` input (several skills)


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
            import tritonclient.grpc.aio as aio

            self._client = aio.InferenceServerClient(self.url)
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
                                              tasks=TASK in inputs)
                self._index = index
                self._index_at = now
            return self._index

    async def _served_names(self) -> tuple[set[str], set[str]]:
        """All model names and the READY ones: from the repository index, or where the launcher keeps it behind
        its admin key, from the statistics API and each model's readiness."""
        from triton_vlm.client.client import is_restricted, statistics_models

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
    async def infer(self, model: str, image: bytes, prompt: str, sampling: Sampling, *,
                    entities: bool = False) -> Piece:
        """The whole answer; ``entities``: also ask for the ``entities`` output (only models that have it)."""
        import tritonclient.grpc as grpc_module

        inputs = _inputs(grpc_module, image, prompt, sampling)
        outputs = [grpc_module.InferRequestedOutput(name) for name in (*OUTPUTS, *([ENTITIES] if entities else []))]
        try:
            result = await self._grpc().infer(model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except Exception as exc:
            raise self._error(exc, model) from None
        return _piece(result, entities=entities)

    async def stream(self, model: str, image: bytes, prompt: str, sampling: Sampling, *,
                     entities: bool = False) -> AsyncIterator[Piece]:
        """Pieces of the answer as ``<model>_stream`` generates them; the last has a finish reason (and, with
        ``entities``, the model's ``entities`` output). Closing the iterator early cancels the request in
        Triton."""
        import tritonclient.grpc as grpc_module

        target = f"{model}{STREAM_SUFFIX}"
        inputs = _inputs(grpc_module, image, prompt, sampling)
        inputs.append(_tensor(grpc_module, "stream", np.array([[True]], dtype=np.bool_), "BOOL"))
        outputs = [grpc_module.InferRequestedOutput(name) for name in (*OUTPUTS, *([ENTITIES] if entities else []))]
        finished = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": target, "inputs": inputs, "outputs": outputs}
            await finished.wait()  # keep our side open until the last response is in

        responses = self._grpc().stream_infer(requests(), stream_timeout=self.timeout_s)
        ended = False
        try:
            while True:
                try:
                    result, error = await responses.__anext__()
                except StopAsyncIteration:
                    raise GenerationError(f"{target} ended its stream without a final response") from None
                except Exception as exc:
                    raise self._error(exc, target) from None
                if error is not None:
                    ended = True  # an error response ends the request too
                    raise self._error(error, target)
                piece = _piece(result)
                ended = bool(piece.finish_reason)
                if ended and entities:  # only the final response carries them
                    piece = replace(piece, entities=_entities(result))
                yield piece
                if ended:
                    return
        finally:
            finished.set()
            # Cancel only a request still running (the client left early): cancelling one that just ended races
            # with its final response, and Triton 2.51 then never releases it.
            if not ended:
                responses.cancel()

    # -- errors -------------------------------------------------------------------------------------------
    def _error(self, exc: BaseException, model: str | None) -> TritonVLMError:
        import grpc
        from tritonclient.grpc._utils import get_error_grpc
        from tritonclient.utils import InferenceServerException

        from triton_vlm.client.client import _translate

        if isinstance(exc, TritonVLMError):
            return exc
        if isinstance(exc, grpc.aio.AioRpcError):
            exc = get_error_grpc(exc)
        if isinstance(exc, InferenceServerException):
            status = str(exc.status() or "")
            if "DEADLINE_EXCEEDED" in status:
                return TritonTimeoutError(f"no answer from Triton within {self.timeout_s:g} s")
            if "UNAVAILABLE" in status and "connect" in (exc.message() or "").lower():
                return ServerUnreachableError(f"cannot reach Triton at {self.url}: {exc.message()}")
            return _translate(exc, model, self.url)
        return GenerationError(f"{type(exc).__name__}: {exc}")


def _tensor(module: Any, name: str, array: np.ndarray, triton_type: str) -> Any:
    tensor = module.InferInput(name, list(array.shape), triton_type)
    tensor.set_data_from_numpy(array)
    return tensor


def _inputs(module: Any, image: bytes, prompt: str, sampling: Sampling) -> list[Any]:
    inputs = [_tensor(module, "image", np.frombuffer(image, dtype=np.uint8)[None, :], "UINT8"),
              _tensor(module, "prompt", np.array([[prompt.encode("utf-8")]], dtype=np.object_), "BYTES")]
    for name, value, dtype, triton_type in (("max_tokens", sampling.max_tokens, np.int32, "INT32"),
                                            ("temperature", sampling.temperature, np.float32, "FP32"),
                                            ("top_p", sampling.top_p, np.float32, "FP32"),
                                            ("seed", sampling.seed, np.int64, "INT64")):
        if value is not None:
            inputs.append(_tensor(module, name, np.array([[value]], dtype=dtype), triton_type))
    if sampling.task is not None:
        inputs.append(_tensor(module, "task", np.array([[sampling.task.encode("utf-8")]], dtype=np.object_),
                              "BYTES"))
    return inputs


def _piece(result: Any, *, entities: bool = False) -> Piece:
    return Piece(text=result.as_numpy("generated_text").reshape(-1)[0].decode("utf-8"),
                 prompt_tokens=int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
                 completion_tokens=int(result.as_numpy("generated_tokens").reshape(-1)[0]),
                 finish_reason=result.as_numpy("finish_reason").reshape(-1)[0].decode("utf-8"),
                 entities=_entities(result) if entities else None)


def _entities(result: Any) -> list[dict[str, Any]]:
    """The ``entities`` output as checked plain dicts (the shape :func:`~triton_vlm.client.entities.parse_entities`
    reads); a missing or malformed one is a server-side fault, not the caller's."""
    from triton_vlm.client.entities import parse_entities

    raw = result.as_numpy(ENTITIES)
    if raw is None:
        raise GenerationError("the model did not return its entities output")
    try:
        parsed = parse_entities(raw.reshape(-1)[0])
    except TritonVLMError as exc:
        raise GenerationError(f"the model's entities output is malformed: {exc}") from None
    return [entity_dict(e) for e in parsed]


def entity_dict(entity: Any) -> dict[str, Any]:
    """An :class:`~triton_vlm.client.entities.Entity` as the API's JSON (``span`` a 2-list or null)."""
    def boxes(items: Any) -> list[dict[str, float]]:
        return [{"x_min": b.x_min, "y_min": b.y_min, "x_max": b.x_max, "y_max": b.y_max} for b in items]

    return {"phrase": entity.phrase, "span": list(entity.span) if entity.span is not None else None,
            "boxes": boxes(entity.boxes), "boxes_px": boxes(entity.boxes_px)}
