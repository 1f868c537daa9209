"""The gRPC single-request stream, once sync and once asyncio: send one request, hold the stream open, take its
responses until Triton marks one final, cancel only a request that is still running.

Both loops yield the raw responses that carry outputs (an empty final one marks the end, nothing more); an error
response, a failed stream or a silent one past ``timeout`` is raised as the project's error.

The cancel rule, for both: a request is cancelled when the caller leaves before its final response (closes the
iterator early, is cancelled, or an error or timeout broke the loop), never after it. Cancelling a request that
has just ended races with its final response, and Triton 2.51 then never releases the request: its model can no
longer be unloaded. So a finished request's stream is also read to its end (the server ends it once our side has
half-closed): grpc cancels a call that is collected unfinished.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any

from triton_vlm._protocol.errors import translate
from triton_vlm._protocol.results import Output, parse_output
from triton_vlm.errors import RequestCancelledError, RequestTimeoutError

#: How long a finished request's stream may take to end before it is left to itself.
STREAM_END_WAIT_S = 5.0


@dataclass(frozen=True)
class StreamCall:
    """One request for a stream: the model, its input tensors and, optionally, the outputs to return."""

    model: str
    inputs: list[Any]
    outputs: list[Any] | None = None
    #: The choices the request asks for (its ``n``): it is answered once each has had its finish reason.
    choices: int = 1


def is_final(result: Any) -> bool:
    """Whether Triton marked this stream response the request's last (``triton_final_response``)."""
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and bool(parameters["triton_final_response"].bool_param)


def has_outputs(result: Any) -> bool:
    """False for the empty response that only carries the final flag."""
    return bool(result.get_response().outputs)


def _no_response(call: StreamCall, timeout: float | None) -> RequestTimeoutError:
    return RequestTimeoutError(f"no response from {call.model} in {timeout:g}s", model=call.model)


def stream_sync(client: Any, call: StreamCall, *, url: str,
                timeout: float | None = None) -> Generator[Any, None, None]:
    """The responses of ``call`` on ``client`` (a ``tritonclient.grpc.InferenceServerClient``; one stream at a
    time per client). ``timeout`` bounds the stream and the wait for each response."""
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    finished = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=timeout)
        # The empty final response ends a request that its model ended without an answer (aborted) as well.
        try:
            client.async_stream_infer(call.model, call.inputs, outputs=call.outputs, enable_empty_final_response=True)
        except Exception as exc:  # the stream broke before the request went out: its callback has the reason
            finished = True
            try:
                _result, reason = responses.get_nowait()
            except queue.Empty:
                reason = None
            raise _error(reason or exc, call, url, timeout) from None
        while not finished:
            try:
                result, error = responses.get(timeout=timeout)
            except queue.Empty:
                raise _no_response(call, timeout) from None
            if error is not None:
                finished = True  # an error response ends the request too: nothing left to cancel
                raise _error(error, call, url, timeout)
            finished = is_final(result)
            if has_outputs(result):
                yield result
    finally:
        client.stop_stream(cancel_requests=not finished)  # the cancel rule (module docstring)


async def stream_async(client: Any, call: StreamCall, *, url: str,
                       timeout: float | None = None) -> AsyncGenerator[Any, None]:
    """The responses of ``call`` on ``client`` (a ``tritonclient.grpc.aio.InferenceServerClient``), each call a
    stream of its own. ``timeout`` bounds the stream and the wait for each response.

    ``tritonclient.grpc.aio`` cannot ask for empty final responses, so a request its model ends without an
    answer (aborted) ends with the stream (``stream_timeout``)."""
    done = asyncio.Event()

    async def one_request() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": call.model, "inputs": call.inputs, "outputs": call.outputs}
        await done.wait()  # the request side stays open until the final response; then the server ends the stream

    responses = client.stream_infer(one_request(), stream_timeout=timeout)
    finished = False
    try:
        while not finished:
            try:
                result, error = await asyncio.wait_for(responses.__anext__(), timeout)
            except StopAsyncIteration:
                finished = True  # the server ended the stream: no request left on it
                return
            except asyncio.TimeoutError:
                raise _no_response(call, timeout) from None
            except Exception as exc:  # the stream failed: translated, or a bug that propagates as it is
                raise _error(exc, call, url, timeout) from None
            if error is not None:
                finished = True  # an error response ends the request too: nothing left to cancel
                raise _error(error, call, url, timeout)
            finished = is_final(result)
            if has_outputs(result):
                yield result
    finally:
        done.set()
        cancel = getattr(responses, "cancel", None)
        if not finished and cancel is not None:  # the cancel rule (module docstring)
            cancel()
        elif finished:
            # Shielded: a caller cancelled now (an HTTP client that left once it had the last piece) must not
            # cancel the call at the moment its request ended (the race in the module docstring).
            await asyncio.shield(_read_to_end(responses))


async def _read_to_end(responses: AsyncIterator[Any]) -> None:
    """Wait for the server to end a finished request's stream (see the module docstring)."""
    async def drain() -> None:
        async for _ in responses:
            pass

    try:
        await asyncio.wait_for(drain(), STREAM_END_WAIT_S)
    except Exception:  # noqa: BLE001 - the request is over: how its stream ends changes nothing
        pass


def outputs_sync(client: Any, call: StreamCall, *, url: str,
                 timeout: float | None = None) -> Generator[Output, None, None]:
    """:func:`stream_sync`'s responses as :class:`Output` (a request for ``n`` choices: their pieces interleaved,
    each with its ``index``); a request that ends before every choice had its finish reason (its model aborted
    it) is a :class:`RequestCancelledError`."""
    ended: set[int] = set()
    responses = stream_sync(client, call, url=url, timeout=timeout)
    try:
        for result in responses:
            output = parse_output(result)
            if output.finish_reason:
                _ended(output, ended)
            yield output
    finally:
        responses.close()  # now, not when it is collected: that is what cancels an unfinished request
    _check_answered(ended, call)


async def outputs_async(client: Any, call: StreamCall, *, url: str,
                        timeout: float | None = None) -> AsyncGenerator[Output, None]:
    """:func:`stream_async`'s responses as :class:`Output` (see :func:`outputs_sync`)."""
    ended: set[int] = set()
    responses = stream_async(client, call, url=url, timeout=timeout)
    try:
        async for result in responses:
            output = parse_output(result)
            if output.finish_reason:
                _ended(output, ended)
            yield output
    finally:
        await responses.aclose()  # now, not when the event loop collects it: that is what cancels the request
    _check_answered(ended, call)


def _ended(output: Output, ended: set[int]) -> None:
    """Note the choices ``output`` (one with a finish reason) ends: its own, and a whole answer's further ones."""
    ended.add(output.index)
    ended.update(choice.index for choice in output.choices)


def _check_answered(ended: set[int], call: StreamCall) -> None:
    if len(ended) < call.choices:
        raise RequestCancelledError(f"{call.model} ended the request without an answer (cancelled?)",
                                    model=call.model)


def _error(exc: BaseException, call: StreamCall, url: str, timeout: float | None) -> BaseException:
    return translate(exc, model=call.model, url=url, timeout=timeout) or exc
