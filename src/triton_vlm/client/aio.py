"""``AsyncTritonVLMClient``: the asyncio twin of :class:`~triton_vlm.client.TritonVLMClient`.

Built on ``tritonclient.http.aio`` (aiohttp) and ``tritonclient.grpc.aio``; requests are built and answers
parsed by the same functions as the sync client's, and errors are the same classes.

>>> async with AsyncTritonVLMClient("localhost:8000", retry=5) as client:       # doctest: +SKIP
...     print(await client.infer("llava", "test_images/sample_image.jpg", "What is this?"))
...     async for piece in client.stream("llava", "test_images/sample_image.jpg", "Describe it."):
...         print(piece, end="")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from triton_vlm.client.client import (BatchItem, BatchResults, ImageLike, InferenceResult, Protocol, ServerEndpoint,
                                      StreamPiece, _translate, batch_item, connection_lost, is_restricted,
                                      parse_piece, parse_result, request_inputs, statistics_models, stream_target)
from triton_vlm.client.retry import RetryPolicy
from triton_vlm.errors import RequestTimeoutError, ServerUnreachableError, TritonVLMError


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
                           task: str | None = None, ignore_eos: bool = False) -> InferenceResult:
        module = self._module()
        inputs = request_inputs(module, image, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                seed=seed, task=task, ignore_eos=True if ignore_eos else None)
        started = time.perf_counter()
        # As the sync client: no output list, so optional outputs (kosmos2's entities) come back too.
        result = await self._call(lambda c: c.infer(model_name, inputs), model_name)
        return parse_result(result, time.perf_counter() - started)

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
                            task: str | None = None) -> AsyncIterator[StreamPiece]:
        """Streamed pieces with token counts; the last one has the finish reason. Leaving early cancels."""
        import tritonclient.grpc.aio as grpc_aio

        inputs = request_inputs(grpc_aio, image, prompt, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, ignore_eos=ignore_eos, stream=True, task=task)
        target = stream_target(model_name)
        started = time.monotonic()
        delays = self.retry.delays()
        while True:
            pieces = self._stream_once(target, inputs)
            try:
                first = await pieces.__anext__()
            except StopAsyncIteration:
                return
            except self.retry.retry_on as exc:
                await pieces.aclose()
                await asyncio.sleep(self.retry._next(delays, started, time.monotonic, exc))
                continue
            try:
                yield first
                async for piece in pieces:
                    yield piece
            finally:
                await pieces.aclose()
            return

    async def _stream_once(self, target: str, inputs: list[Any]) -> AsyncIterator[StreamPiece]:
        import grpc
        from tritonclient.utils import InferenceServerException

        client = self._grpc_stream_client()
        done = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": target, "inputs": inputs}
            await done.wait()  # keep the stream open until the final response

        responses = client.stream_infer(requests(), stream_timeout=self.timeout)
        finished = False
        try:
            while True:
                try:
                    result, error = await asyncio.wait_for(responses.__anext__(), self.timeout)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise RequestTimeoutError(f"no response from {target} in {self.timeout:g}s") from None
                except InferenceServerException as exc:
                    raise _translate(exc, target, self.grpc_url, self.timeout) from None
                except grpc.RpcError as exc:  # the stream itself failed (e.g. nothing listens there)
                    raise _translate(InferenceServerException(msg=exc.details(), status=str(exc.code())), target,
                                     self.grpc_url, self.timeout) from None
                finished = error is not None  # an error response ends the request too
                piece = parse_piece(result, error, target, self.grpc_url, self.timeout)
                finished = bool(piece.finish_reason)
                yield piece
                if finished:
                    return
        finally:
            done.set()
            # Cancel only a request still running: cancelling one that just ended races with its final response,
            # and Triton 2.51 then never releases it (the <model>_stream model could no longer unload).
            cancel = getattr(responses, "cancel", None)
            if cancel is not None and not finished:
                cancel()

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
    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        return module

    def _get_client(self) -> Any:
        if self._client is None:
            module = self._module()
            self._client = (module.InferenceServerClient(self.url) if self.protocol == "grpc" else
                            module.InferenceServerClient(self.url, conn_timeout=self.timeout))
        return self._client

    def _grpc_stream_client(self) -> Any:
        if self._stream_client is None:
            if self.protocol == "grpc" and self.grpc_url == self.url:
                return self._get_client()
            import tritonclient.grpc.aio as grpc_aio

            self._stream_client = grpc_aio.InferenceServerClient(self.grpc_url)
        return self._stream_client

    async def _call(self, fn: Callable[[Any], Any], model_name: str | None) -> Any:
        return await self.retry.acall(lambda: self._call_once(fn, model_name))

    async def _call_once(self, fn: Callable[[Any], Any], model_name: str | None) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return await asyncio.wait_for(fn(self._get_client()), self.timeout)
        except InferenceServerException as exc:
            raise _translate(exc, model_name, self.url, self.timeout) from None
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"no answer from {self.url} within {self.timeout:g}s") from None
        except (ConnectionError, OSError) as exc:
            raise ServerUnreachableError(f"cannot reach triton-vlm server at {self.url}: {exc}") from None
        except Exception as exc:
            # aiohttp's connection errors (ClientConnectorError is an OSError; others are not)
            if type(exc).__name__ == "ServerDisconnectedError":
                raise connection_lost(self.url, exc) from None
            if type(exc).__module__.startswith("aiohttp"):
                raise ServerUnreachableError(f"cannot reach triton-vlm server at {self.url}: {exc}") from None
            raise
