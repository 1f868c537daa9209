"""``AsyncTritonVLMClient``: the asyncio twin of :class:`~triton_vlm.client.TritonVLMClient`.

Built on ``tritonclient.http.aio`` (aiohttp) and ``tritonclient.grpc.aio``; requests, answers, the stream loop
and errors are :mod:`triton_vlm._protocol`'s, as the sync client's are.

>>> async with AsyncTritonVLMClient("localhost:8000", retry=5) as client:       # doctest: +SKIP
...     print(await client.infer("llava", "test_images/sample_image.jpg", "What is this?"))
...     async for piece in client.stream("llava", "test_images/sample_image.jpg", "Describe it."):
...         print(piece, end="")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import replace
from typing import Any

from triton_vlm._protocol.connect import make_client
from triton_vlm._protocol.errors import is_restricted, translate
from triton_vlm._protocol.results import Output, parse_output, statistics_models
from triton_vlm._protocol.stream import StreamCall, outputs_async
from triton_vlm._protocol.tensors import Api, RequestFields, request_inputs
from triton_vlm.client.client import (
    BatchItem,
    BatchResults,
    ImageLike,
    InferenceResult,
    Messages,
    Protocol,
    ResponseFormatLike,
    ServerEndpoint,
    StreamPiece,
    batch_item,
    chat_fields,
    inference_result,
    is_stream_model,
    request_fields,
    stream_call,
    stream_piece,
)
from triton_vlm.client.retry import RetryPolicy
from triton_vlm.errors import ServerUnreachableError, TritonVLMError


class AsyncTritonVLMClient(ServerEndpoint):
    """An asyncio client for one triton-vlm server; use it from one event loop (``async with`` closes it).

    Same arguments as :class:`~triton_vlm.client.TritonVLMClient`: ``timeout`` bounds every call
    (:class:`RequestTimeoutError`), ``retry`` retries calls while the server is not up yet.
    """

    def __init__(self, url: str = "localhost:8000", *, protocol: Protocol = "http", timeout: float = 300.0,
                 grpc_url: str | None = None, retry: RetryPolicy | int | bool | None = None) -> None:
        super().__init__(url, protocol=protocol, timeout=timeout, grpc_url=grpc_url, retry=retry)
        self._client: Any = None
        self._stream_client: Any = None

    # -- inference ----------------------------------------------------------------------------------------
    async def infer(self, model_name: str, image: ImageLike, prompt: str, **options: Any) -> str:
        """The generated text (options as :meth:`infer_result`)."""
        return (await self.infer_result(model_name, image, prompt, **options)).text

    async def infer_result(self, model_name: str, image: ImageLike, prompt: str, *, max_tokens: int | None = None,
                           temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                           task: str | None = None, ignore_eos: bool = False,
                           response_format: ResponseFormatLike | None = None, **sampling: Any) -> InferenceResult:
        return await self._whole(model_name, request_fields(
            image, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, task=task,
            ignore_eos=ignore_eos, response_format=response_format, **sampling))

    async def chat(self, model_name: str, messages: Messages, images: Iterable[ImageLike] = (), **options: Any) -> str:
        """The answer to the conversation ``messages`` (see :meth:`TritonVLMClient.chat
        <triton_vlm.client.TritonVLMClient.chat>`); options as :meth:`chat_result`."""
        return (await self.chat_result(model_name, messages, images, **options)).text

    async def chat_result(self, model_name: str, messages: Messages, images: Iterable[ImageLike] = (), *,
                          max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                          seed: int | None = None, ignore_eos: bool = False,
                          response_format: ResponseFormatLike | None = None, **sampling: Any) -> InferenceResult:
        return await self._whole(model_name, chat_fields(messages, images, max_tokens=max_tokens,
                                                         temperature=temperature, top_p=top_p, seed=seed,
                                                         ignore_eos=ignore_eos, response_format=response_format,
                                                         **sampling))

    async def _whole(self, model_name: str, fields: RequestFields) -> InferenceResult:
        """The whole answer to ``fields``: a plain infer call, or the one response of a ``<model>_stream`` model."""
        started = time.perf_counter()
        if is_stream_model(model_name):
            outputs = [output async for output in self._outputs(
                stream_call(model_name, "grpc.aio", replace(fields, stream=False)))]
            return inference_result(outputs[-1], time.perf_counter() - started)
        inputs = request_inputs(self._api(), fields)
        # As the sync client: no output list, so optional outputs (kosmos2's entities) come back too.
        result = await self._call(lambda c: c.infer(model_name, inputs), model_name)
        return inference_result(parse_output(result), time.perf_counter() - started)

    async def infer_many(self, model_name: str, items: Iterable[BatchItem], *, concurrency: int = 4,
                         progress: bool | None = True, return_exceptions: bool = False,
                         on_result: Callable[[int, InferenceResult | TritonVLMError], None] | None = None,
                         **common: Any) -> list[InferenceResult | TritonVLMError]:
        """:meth:`infer_result` for every item, at most ``concurrency`` in flight; results in item order (see
        :meth:`TritonVLMClient.infer_many <triton_vlm.client.TritonVLMClient.infer_many>`)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        requests = [batch_item(item, model_name, common) for item in items]
        gate = asyncio.Semaphore(concurrency)
        gathered = BatchResults(len(requests), progress, f"{model_name} x{concurrency}", return_exceptions, on_result)

        async def run(index: int) -> None:
            model, kwargs = requests[index]
            async with gate:
                try:
                    outcome: InferenceResult | TritonVLMError = await self.infer_result(model, **kwargs)
                except TritonVLMError as exc:
                    outcome = exc
            gathered.add(index, outcome)

        tasks = [asyncio.ensure_future(run(i)) for i in range(len(requests))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            gathered.close()
        return gathered.results

    async def stream(self, model_name: str, image: ImageLike, prompt: str, **options: Any) -> AsyncIterator[str]:
        """The answer piece by piece (gRPC streaming to ``<model>_stream``); options as :meth:`stream_pieces`."""
        async for piece in self.stream_pieces(model_name, image, prompt, **options):
            if piece.text:
                yield piece.text

    async def stream_pieces(self, model_name: str, image: ImageLike, prompt: str, *, max_tokens: int | None = None,
                            temperature: float | None = None, top_p: float | None = None,
                            seed: int | None = None, ignore_eos: bool = False,
                            task: str | None = None, **sampling: Any) -> AsyncIterator[StreamPiece]:
        """Streamed pieces with token counts; the last one has the finish reason. Leaving early cancels.
        ``sampling`` as :meth:`TritonVLMClient.stream_pieces <triton_vlm.client.TritonVLMClient.stream_pieces>`
        takes it (``n`` > 1: the choices' pieces interleaved, each with its ``index``)."""
        outputs = self._outputs(stream_call(model_name, "grpc.aio", request_fields(
            image, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            ignore_eos=ignore_eos, task=task, stream=True, **sampling)))
        try:
            async for output in outputs:
                yield stream_piece(output)
        finally:
            await outputs.aclose()

    async def _outputs(self, call: StreamCall) -> AsyncGenerator[Output, None]:
        """``call``'s responses; with a retry policy, started again where it fails before its first one."""
        started = time.monotonic()
        delays = self.retry.delays()
        while True:
            outputs = outputs_async(self._grpc_stream_client(), call, url=self.grpc_url, timeout=self.timeout)
            try:
                first = await outputs.__anext__()
            except StopAsyncIteration:
                return
            except self.retry.retry_on as exc:
                await outputs.aclose()
                await asyncio.sleep(self.retry._next(delays, started, time.monotonic, exc))
                continue
            try:
                yield first
                async for output in outputs:
                    yield output
            finally:
                await outputs.aclose()  # now, where the caller left early: that cancels the request
            return

    # -- server state -------------------------------------------------------------------------------------
    async def is_ready(self, model_name: str | None = None) -> bool:
        try:
            client = self._get_client()
            ready = client.is_model_ready(model_name) if model_name else client.is_server_ready()
            return bool(await asyncio.wait_for(ready, min(self.timeout, 5.0)))
        except Exception:
            return False

    async def wait_until_ready(self, timeout: float = 60.0, model_name: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not await self.is_ready(model_name):
            if time.monotonic() >= deadline:
                what = f"model {model_name!r} on " if model_name else ""
                raise ServerUnreachableError(f"{what}{self.url} not ready after {timeout:.0f}s")
            await asyncio.sleep(0.25)

    async def list_models(self) -> list[dict[str, str]]:
        """As :meth:`TritonVLMClient.list_models` (the statistics API where the index is restricted)."""
        grpc = self.protocol == "grpc"
        try:
            if grpc:
                index = await self._call(lambda c: c.get_model_repository_index(as_json=True), None)
                return [{"name": m.get("name", ""), "version": m.get("version", ""), "state": m.get("state", "")}
                        for m in index.get("models", [])]
            index = await self._call(lambda c: c.get_model_repository_index(), None)
            return [{k: str(v) for k, v in m.items()} for m in index]
        except TritonVLMError as exc:
            if not is_restricted(exc):
                raise
        stats = await self._call(lambda c: c.get_inference_statistics(as_json=True) if grpc
                                 else c.get_inference_statistics(), None)
        return [{"name": name, "version": version, "state": "READY" if await self.is_ready(name) else "UNAVAILABLE"}
                for name, version in statistics_models(stats)]

    async def close(self) -> None:
        for client in (self._client, self._stream_client):
            if client is not None:
                try:
                    await client.close()
                except Exception:
                    pass
        self._client = self._stream_client = None

    async def __aenter__(self) -> AsyncTritonVLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------------------------
    def _get_client(self) -> Any:
        if self._client is None:
            self._client = make_client(self._api(), self.url, timeout=self.timeout)
        return self._client

    def _api(self) -> Api:
        return "grpc.aio" if self.protocol == "grpc" else "http.aio"

    def _grpc_stream_client(self) -> Any:
        if self._stream_client is None:
            if self.protocol == "grpc" and self.grpc_url == self.url:
                return self._get_client()
            self._stream_client = make_client("grpc.aio", self.grpc_url)
        return self._stream_client

    async def _call(self, fn: Callable[[Any], Any], model_name: str | None) -> Any:
        return await self.retry.acall(lambda: self._call_once(fn, model_name))

    async def _call_once(self, fn: Callable[[Any], Any], model_name: str | None) -> Any:
        try:
            return await asyncio.wait_for(fn(self._get_client()), self.timeout)
        except Exception as exc:  # aiohttp's connection errors too (ClientConnectorError is an OSError; others not)
            error = translate(exc, model=model_name, url=self.url, timeout=self.timeout)
            if error is None:
                raise
            raise error from None
