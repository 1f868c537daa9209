"""``TritonVLMClient``: send an image and a prompt to a served model, get text back.

Errors come back as the project's exception tree (:mod:`triton_vlm.errors`): a bad image is an
:class:`InvalidInputError`, an unknown model an :class:`UnknownModelError`, a server that is down a
:class:`ServerUnreachableError` (:class:`ConnectionLostError` where it hung up mid-request), no answer
within ``timeout`` a :class:`RequestTimeoutError`.

Triton's protocol (tensors, answers, the stream loop, errors) is :mod:`triton_vlm._protocol`'s, shared with the
asyncio client (:mod:`triton_vlm.client.aio`), the OpenAI front and the forwarder.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from triton_vlm._protocol.connect import make_client
from triton_vlm._protocol.errors import is_restricted, translate
from triton_vlm._protocol.results import STREAM_SUFFIX, Output, parse_output, statistics_models, stream_model
from triton_vlm._protocol.stream import StreamCall, outputs_sync
from triton_vlm._protocol.tensors import Api, RequestFields, request_inputs
from triton_vlm._protocol.wire import Choice, TokenLogprob
from triton_vlm.client.entities import Entity, parse_entities
from triton_vlm.client.retry import RetryPolicy
from triton_vlm.errors import InvalidInputError, ServerUnreachableError, TritonVLMError

ImageLike = str | Path | bytes | bytearray | Image.Image | npt.NDArray[Any]
Protocol = Literal["http", "grpc"]
#: A chat's messages: OpenAI's chat shape (``{"role", "content"}``; content a string, or text parts and
#: ``{"type": "image"}`` parts that take the call's ``images`` in order), or the same already as JSON.
Messages = Sequence[Mapping[str, Any]] | str
#: OpenAI's ``response_format`` object (structured output), or the same already as JSON.
ResponseFormatLike = Mapping[str, Any] | str
#: One item of :meth:`TritonVLMClient.infer_many`: ``(image, prompt)`` or a dict of :meth:`infer_result`'s
#: keyword arguments (``image`` and ``prompt`` required; ``model_name`` overrides the call's model).
BatchItem = tuple[ImageLike, str] | Mapping[str, Any]


@dataclass(frozen=True)
class StreamPiece:
    """One streamed response: new text, tokens generated so far, and the finish reason on the last one (of its
    choice: a request for ``n`` choices streams their pieces interleaved, each with its ``index``)."""

    text: str
    generated_tokens: int
    prompt_tokens: int
    finish_reason: str
    #: On the last piece: grounded phrases with their boxes (kosmos2 with a ``<grounding>`` prompt).
    entities: list[Entity] = field(default_factory=list)
    #: The choice this piece belongs to (0 to n-1).
    index: int = 0
    #: On a choice's last piece: prompt positions the engine's prefix cache held.
    cached_tokens: int = 0


@dataclass(frozen=True)
class InferenceResult:
    """Everything a served model returns for one request."""

    text: str
    generated_tokens: int
    prompt_tokens: int
    finish_reason: str
    latency_s: float
    #: Grounded phrases with their boxes (kosmos2 with a ``<grounding>`` prompt); empty for models without an
    #: ``entities`` output.
    entities: list[Entity] = field(default_factory=list)
    #: Each generated token's logprob and alternatives (asked for with ``logprobs=True``, ``top_logprobs=k``).
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: Choices 1 to n-1 of a request with ``n`` > 1 (this result is choice 0).
    choices: list[Choice] = field(default_factory=list)
    #: Prompt positions the engine's prefix cache held (not prefilled again); 0 from the batched loop.
    cached_tokens: int = 0


def encode_image(image: ImageLike) -> bytes:
    """File bytes for any accepted image form: a path, encoded bytes, a PIL image, or an HxW[xC] uint8 array.

    A 1-D uint8 array is taken as already-encoded file bytes.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InvalidInputError(f"image: no such file {str(path)!r}", param="image")
        return path.read_bytes()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 1 and image.dtype == np.uint8:
            return image.tobytes()
        if image.ndim in (2, 3) and image.dtype == np.uint8:
            image = Image.fromarray(image)
        else:
            raise InvalidInputError(
                f"image: an array must be HxW or HxWxC uint8 pixels (or 1-D file bytes), got "
                f"{image.dtype} {list(image.shape)}", param="image")
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise InvalidInputError(f"image: unsupported type {type(image).__name__}", param="image")


# -- request fields and answers (shared with the asyncio client) ----------------------------------------------
def request_fields(image: ImageLike, prompt: str, *, max_tokens: int | None = None,
                   temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                   task: str | None = None, ignore_eos: bool = False, stream: bool | None = None,
                   response_format: ResponseFormatLike | None = None, **sampling: Any) -> RequestFields:
    """One request's fields; ``ignore_eos=False`` is not sent (the model's default). ``sampling``: the further
    options of :class:`~triton_vlm._protocol.tensors.RequestFields` (``stop``, ``n``, ``logprobs``, penalties)."""
    return RequestFields(image=encode_image(image), prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, seed=seed, ignore_eos=True if ignore_eos else None, task=task, stream=stream,
                         response_format=response_format_json(response_format), **_sampling(sampling))


def chat_fields(messages: Messages, images: Iterable[ImageLike] = (), *, max_tokens: int | None = None,
                temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                ignore_eos: bool = False, stream: bool | None = None,
                response_format: ResponseFormatLike | None = None, **sampling: Any) -> RequestFields:
    """A chat request's fields: ``messages`` as JSON and each image's file bytes, in order; ``sampling`` as for
    :func:`request_fields`."""
    text = messages if isinstance(messages, str) else json.dumps(list(messages), ensure_ascii=False)
    return RequestFields(messages=text, images=tuple(encode_image(image) for image in images), max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, seed=seed, ignore_eos=True if ignore_eos else None,
                         stream=stream, response_format=response_format_json(response_format), **_sampling(sampling))


def response_format_json(value: ResponseFormatLike | None) -> str | None:
    """``response_format`` as the JSON text the model takes (a dict is serialized, a string sent as it is)."""
    return value if value is None or isinstance(value, str) else json.dumps(dict(value))


def _sampling(options: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling options as RequestFields takes them (``stop`` a tuple; a single string is one stop string)."""
    stop = options.get("stop")
    return {**options, "stop": (stop,) if isinstance(stop, str) else tuple(stop or ())}


def inference_result(output: Output, latency_s: float) -> InferenceResult:
    return InferenceResult(text=output.text, generated_tokens=output.generated_tokens,
                           prompt_tokens=output.prompt_tokens, finish_reason=output.finish_reason,
                           latency_s=latency_s, entities=_entities(output), logprobs=list(output.logprobs),
                           choices=list(output.choices), cached_tokens=output.cached_tokens)


def stream_piece(output: Output) -> StreamPiece:
    return StreamPiece(text=output.text, generated_tokens=output.generated_tokens,
                       prompt_tokens=output.prompt_tokens, finish_reason=output.finish_reason,
                       entities=_entities(output), index=output.index, cached_tokens=output.cached_tokens)


def stream_call(model_name: str, api: Api, fields: RequestFields) -> StreamCall:
    """The gRPC stream call of ``fields`` to ``model_name``'s ``<model>_stream`` (as many choices as it asks for)."""
    return StreamCall(stream_model(model_name), request_inputs(api, fields), choices=fields.n or 1)


def is_stream_model(model_name: str) -> bool:
    """Whether ``model_name`` names an engine model (decoupled: Triton refuses it plain infer calls, so its whole
    answers come as the one response of a gRPC stream with ``stream: false``)."""
    return model_name.endswith(STREAM_SUFFIX)


def _entities(output: Output) -> list[Entity]:
    """The ``entities`` output where the response has one (kosmos2's; a stream's last piece), else none."""
    return [] if output.entities is None else parse_entities(output.entities)


def batch_item(item: BatchItem, model_name: str, common: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(model, infer_result keyword arguments)`` for one :meth:`TritonVLMClient.infer_many` item."""
    if isinstance(item, Mapping):
        kwargs = {**common, **item}
    else:
        image, prompt = item
        kwargs = {**common, "image": image, "prompt": prompt}
    if "image" not in kwargs or "prompt" not in kwargs:
        raise InvalidInputError("infer_many: every item needs an image and a prompt")
    return kwargs.pop("model_name", model_name), kwargs


class BatchResults:
    """What ``infer_many`` gathers: each item's result or error in item order, a tqdm bar on stderr
    (``progress=None``: only when stderr is a terminal) and the caller's ``on_result`` callback."""

    def __init__(self, total: int, progress: bool | None, description: str, return_exceptions: bool,
                 on_result: Callable[[int, InferenceResult | TritonVLMError], None] | None) -> None:
        import sys

        self.results: list[Any] = [None] * total
        self.return_exceptions, self.on_result = return_exceptions, on_result
        self.bar = None
        if progress or (progress is None and sys.stderr.isatty()):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, unit="req", leave=False, dynamic_ncols=True)

    def add(self, index: int, outcome: InferenceResult | TritonVLMError) -> None:
        """Record item ``index``; an error is raised again unless ``return_exceptions``."""
        if isinstance(outcome, TritonVLMError) and not self.return_exceptions:
            raise outcome
        self.results[index] = outcome
        if self.on_result is not None:
            self.on_result(index, outcome)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def split_url(url: str) -> str:
    return url.removeprefix("http://").removeprefix("https://").removeprefix("grpc://").rstrip("/")


def default_grpc_url(url: str, protocol: str) -> str:
    return url if protocol == "grpc" else url.rsplit(":", 1)[0] + ":8001"


class ServerEndpoint:
    """What both clients hold: the server's HTTP or gRPC address, where streams go, the timeout and retries."""

    def __init__(self, url: str = "localhost:8000", *, protocol: Protocol = "http", timeout: float = 300.0,
                 grpc_url: str | None = None, retry: RetryPolicy | int | bool | None = None) -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', not {protocol!r}")
        self.url = split_url(url)
        self.protocol: Protocol = protocol
        #: Where streams connect (token streaming is gRPC); default: this host, port 8001.
        self.grpc_url = split_url(grpc_url) if grpc_url else default_grpc_url(self.url, protocol)
        self.timeout = timeout
        self.retry = RetryPolicy.coerce(retry)


class TritonVLMClient(ServerEndpoint):
    """A client for one triton-vlm server. Thread-safe: each thread gets its own connection.

    ``timeout`` (seconds) bounds every call (:class:`RequestTimeoutError` past it). ``retry`` retries calls that
    fail because the server is not up yet or a model is UNAVAILABLE, with exponential backoff: a
    :class:`RetryPolicy`, or a number of retries (default: none). Invalid requests are never retried.

    >>> client = TritonVLMClient(url="localhost:8000", retry=5)
    >>> client.infer(model_name="llava", image="test_images/sample_image.jpg", prompt="What is this?")
    """

    def __init__(self, url: str = "localhost:8000", *, protocol: Protocol = "http",
                 timeout: float = 300.0, grpc_url: str | None = None,
                 retry: RetryPolicy | int | bool | None = None) -> None:
        super().__init__(url, protocol=protocol, timeout=timeout, grpc_url=grpc_url, retry=retry)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()

    # -- inference ----------------------------------------------------------------------------------------
    def infer(self, model_name: str, image: ImageLike, prompt: str, *, max_tokens: int | None = None,
              temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
              task: str | None = None, ignore_eos: bool = False,
              response_format: ResponseFormatLike | None = None) -> str:
        """The generated text for ``prompt`` about ``image``.

        ``task`` picks a skill of models that have several (moondream2: ``caption[:short|normal|long]``,
        ``query``, ``detect``, ``point``); leave it out for the others. ``response_format`` is OpenAI's
        (``{"type": "json_schema", "json_schema": {"schema": {...}}}`` or ``{"type": "json_object"}``): the
        answer is JSON that follows it.
        """
        return self.infer_result(model_name, image, prompt, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, task=task, ignore_eos=ignore_eos,
                                 response_format=response_format).text

    def infer_result(self, model_name: str, image: ImageLike, prompt: str, *, max_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     seed: int | None = None, task: str | None = None,
                     ignore_eos: bool = False, response_format: ResponseFormatLike | None = None,
                     **sampling: Any) -> InferenceResult:
        """Like :meth:`infer`, with token counts, finish reason, latency and the model's optional outputs
        (``entities``). ``ignore_eos`` generates exactly ``max_tokens`` tokens (benchmarks)."""
        return self._whole(model_name, request_fields(
            image, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, task=task,
            ignore_eos=ignore_eos, response_format=response_format, **sampling))

    def chat(self, model_name: str, messages: Messages, images: Iterable[ImageLike] = (), **options: Any) -> str:
        """The model's answer to the conversation ``messages``, rendered with the model's own chat template; its
        ``{"type": "image"}`` parts take ``images`` in order (none: a text-only chat). Options as
        :meth:`chat_result`.

        >>> client.chat("llava", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        ...                       {"role": "assistant", "content": "A cat."},
        ...                       {"role": "user", "content": "What colour is it?"}], images=["cat.jpg"])  # doctest: +SKIP
        """
        return self.chat_result(model_name, messages, images, **options).text

    def chat_result(self, model_name: str, messages: Messages, images: Iterable[ImageLike] = (), *,
                    max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                    seed: int | None = None, ignore_eos: bool = False,
                    response_format: ResponseFormatLike | None = None, **sampling: Any) -> InferenceResult:
        """Like :meth:`chat`, with token counts, finish reason and latency (the :meth:`infer_result` of a chat);
        ``response_format`` as for :meth:`infer`."""
        return self._whole(model_name, chat_fields(messages, images, max_tokens=max_tokens, temperature=temperature,
                                                   top_p=top_p, seed=seed, ignore_eos=ignore_eos,
                                                   response_format=response_format, **sampling))

    def _whole(self, model_name: str, fields: RequestFields) -> InferenceResult:
        """The whole answer to ``fields``: a plain infer call, or the one response of a ``<model>_stream`` model."""
        started = time.perf_counter()
        if is_stream_model(model_name):
            *_, output = self._outputs(stream_call(model_name, "grpc", replace(fields, stream=False)))
            return inference_result(output, time.perf_counter() - started)
        inputs = request_inputs(self.protocol, fields)
        # No output list: the model returns all it declares, optional ones such as kosmos2's entities included.
        result = self._call(lambda c: c.infer(model_name, inputs, **self._timeout_kwargs()), model_name)
        return inference_result(parse_output(result), time.perf_counter() - started)

    def infer_many(self, model_name: str, items: Iterable[BatchItem], *, concurrency: int = 4,
                   progress: bool | None = True, return_exceptions: bool = False,
                   on_result: Callable[[int, InferenceResult | TritonVLMError], None] | None = None,
                   **common: Any) -> list[InferenceResult | TritonVLMError]:
        """:meth:`infer_result` for every item, ``concurrency`` at a time (Triton batches them); results in
        item order.

        Items are ``(image, prompt)`` pairs or dicts of :meth:`infer_result` arguments; ``common`` arguments
        (``max_tokens=16``...) apply to all. ``progress`` shows a tqdm bar on stderr (None: only on a terminal).
        The first failure is raised unless ``return_exceptions``, which puts each failure in its item's place.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        requests = [batch_item(item, model_name, common) for item in items]
        gathered = BatchResults(len(requests), progress, f"{model_name} x{concurrency}", return_exceptions, on_result)

        def run(index: int) -> None:
            model, kwargs = requests[index]
            try:
                outcome: InferenceResult | TritonVLMError = self.infer_result(model, **kwargs)
            except TritonVLMError as exc:
                outcome = exc
            gathered.add(index, outcome)

        try:
            with ThreadPoolExecutor(max_workers=min(concurrency, max(1, len(requests)))) as pool:
                for future in [pool.submit(run, i) for i in range(len(requests))]:
                    future.result()
        finally:
            gathered.close()
        return gathered.results

    def stream(self, model_name: str, image: ImageLike, prompt: str, *, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
               ignore_eos: bool = False, task: str | None = None) -> Iterator[str]:
        """Yield the answer piece by piece as the engine generates it (gRPC streaming to ``<model>_stream``).

        The pieces concatenate to the text :meth:`infer` returns. Leaving the loop early cancels the request.
        A ``task`` the engine does not run (moondream2's captions, detect, point) comes as one piece.
        """
        for piece in self.stream_pieces(model_name, image, prompt, max_tokens=max_tokens, temperature=temperature,
                                        top_p=top_p, seed=seed, ignore_eos=ignore_eos, task=task):
            if piece.text:
                yield piece.text

    def stream_pieces(self, model_name: str, image: ImageLike, prompt: str, *, max_tokens: int | None = None,
                      temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                      ignore_eos: bool = False, task: str | None = None, **sampling: Any) -> Iterator[StreamPiece]:
        """Like :meth:`stream`, with token counts and the finish reason (the last piece has one). ``sampling``: the
        further options :meth:`infer_result` takes (``stop``, ``n``, ``logprobs``, penalties); with ``n`` > 1 the
        choices' pieces come interleaved, each with its ``index`` and each choice's last with its finish reason.

        With a retry policy, a stream that fails before its first piece because the server is not up yet is
        started again."""
        yield from self._stream(stream_call(model_name, "grpc", request_fields(
            image, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            ignore_eos=ignore_eos, task=task, stream=True, **sampling)))

    def chat_stream_pieces(self, model_name: str, messages: Messages, images: Iterable[ImageLike] = (), *,
                           max_tokens: int | None = None, temperature: float | None = None,
                           top_p: float | None = None, seed: int | None = None,
                           ignore_eos: bool = False, **sampling: Any) -> Iterator[StreamPiece]:
        """:meth:`stream_pieces` for a chat (``messages`` and ``images`` as :meth:`chat` takes them): the answer
        to the conversation piece by piece, with token counts; the last piece has the finish reason."""
        yield from self._stream(stream_call(model_name, "grpc", chat_fields(
            messages, images, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            ignore_eos=ignore_eos, stream=True, **sampling)))

    def _stream(self, call: StreamCall) -> Iterator[StreamPiece]:
        """``call``'s pieces (see :meth:`_outputs`)."""
        outputs = self._outputs(call)
        try:
            for output in outputs:
                yield stream_piece(output)
        finally:
            outputs.close()  # now, where the caller left early: that cancels the request

    def _outputs(self, call: StreamCall) -> Generator[Output, None, None]:
        """``call``'s responses; with a retry policy, started again where it fails before its first one."""
        started = time.monotonic()
        delays = self.retry.delays()
        while True:
            outputs = outputs_sync(self._stream_client(), call, url=self.grpc_url, timeout=self.timeout)
            try:
                first = next(outputs)
            except StopIteration:
                return
            except self.retry.retry_on as exc:
                outputs.close()
                time.sleep(self.retry._next(delays, started, time.monotonic, exc))
                continue
            try:
                yield first
                yield from outputs
            finally:
                outputs.close()  # now, where the caller left early: that cancels the request
            return

    # -- server state -------------------------------------------------------------------------------------
    def is_ready(self, model_name: str | None = None) -> bool:
        try:
            client = self._client()
            return bool(client.is_model_ready(model_name) if model_name else client.is_server_ready())
        except Exception:
            return False

    def wait_until_ready(self, timeout: float = 60.0, model_name: str | None = None) -> None:
        """Poll until the server (and ``model_name``, if given) is ready; :class:`ServerUnreachableError` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.is_ready(model_name):
            if time.monotonic() >= deadline:
                what = f"model {model_name!r} on " if model_name else ""
                raise ServerUnreachableError(f"{what}{self.url} not ready after {timeout:.0f}s")
            time.sleep(0.25)

    def list_models(self) -> list[dict[str, str]]:
        """The repository index: name, version and state of every model (and ``reason`` where Triton gives one).

        triton-vlm's launcher keeps the repository API (which also loads and unloads models) behind an admin
        key; without it, the loaded models are listed from the statistics API, each with its readiness.
        """
        try:
            index = self._call(lambda c: c.get_model_repository_index(), None)
        except TritonVLMError as exc:
            if not is_restricted(exc):
                raise
            return self._loaded_models()
        if self.protocol == "grpc":
            return [{"name": m.name, "version": m.version, "state": m.state,
                     **({"reason": m.reason} if m.reason else {})} for m in index.models]
        return [{k: str(v) for k, v in m.items()} for m in index]

    def model_config(self, model_name: str) -> dict[str, Any]:
        """The configuration Triton serves ``model_name`` with (as JSON: ``max_batch_size``, ``instance_group``...)."""
        if self.protocol == "grpc":
            return dict(self._call(lambda c: c.get_model_config(model_name, as_json=True), model_name)["config"])
        return dict(self._call(lambda c: c.get_model_config(model_name), model_name))

    def server_metadata(self) -> dict[str, Any]:
        """Triton's name, version and extensions."""
        if self.protocol == "grpc":
            return dict(self._call(lambda c: c.get_server_metadata(as_json=True), None))
        return dict(self._call(lambda c: c.get_server_metadata(), None))

    def _loaded_models(self) -> list[dict[str, str]]:
        stats = self._call(lambda c: c.get_inference_statistics(), None)
        return [{"name": name, "version": version,
                 "state": "READY" if self.is_ready(name) else "UNAVAILABLE"}
                for name, version in statistics_models(stats)]

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:
                pass

    def __enter__(self) -> TritonVLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = make_client(self.protocol, self.url, timeout=self.timeout)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _stream_client(self) -> Any:
        """This thread's gRPC client for streams (a channel is costly to set up; a stream is not)."""
        client = getattr(self._local, "stream_client", None)
        if client is None:
            client = make_client("grpc", self.grpc_url)
            self._local.stream_client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _timeout_kwargs(self) -> dict[str, Any]:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def _call(self, fn: Any, model_name: str | None) -> Any:
        """``fn(client)`` with errors translated, retried per :attr:`retry`."""
        return self.retry.call(lambda: self._call_once(fn, model_name))

    def _call_once(self, fn: Any, model_name: str | None) -> Any:
        try:
            return fn(self._client())
        except Exception as exc:
            error = translate(exc, model=model_name, url=self.url, timeout=self.timeout)
            if error is None:
                raise
            raise error from None
