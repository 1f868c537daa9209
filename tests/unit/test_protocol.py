"""triton_vlm._protocol: the wire encoding of errors, request tensors, output parsing, the stream loops' cancel
rule (against fake gRPC clients) and the translation of errors into the project's tree."""

from __future__ import annotations

import asyncio
import json
import threading
import types
from collections.abc import AsyncIterator
from http.client import IncompleteRead
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from triton_vlm._protocol.errors import translate
from triton_vlm._protocol.results import Output, parse_output, statistics_models, stream_model
from triton_vlm._protocol.stream import StreamCall, outputs_async, outputs_sync, stream_async, stream_sync
from triton_vlm._protocol.tensors import RequestFields, request_inputs, requested_outputs
from triton_vlm._protocol.wire import (
    CODES,
    Choice,
    TokenLogprob,
    TopLogprob,
    WireError,
    decode_choices,
    decode_error,
    decode_logprobs,
    encode_choices,
    encode_error,
    encode_logprobs,
)
from triton_vlm.errors import (
    ConnectionLostError,
    GenerationError,
    InvalidInputError,
    ModelLoadError,
    ModelUnavailableError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerUnreachableError,
    TritonVLMError,
    UnknownModelError,
)


# -- the wire encoding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("param", [None, "image", "max_tokens"])
def test_encode_decode_round_trip(code: str, param: str | None) -> None:
    message = "image: corrupt or truncated GIF data (index out of range)"
    encoded = encode_error(code, message, param)
    assert encoded == (f"[{code} param={param}] {message}" if param else f"[{code}] {message}")
    assert decode_error(encoded) == WireError(code, message, param)


@pytest.mark.parametrize("error", [InvalidInputError("x", param="prompt"), ModelUnavailableError("x"),
                                   ModelLoadError("x"), UnknownModelError("x"), GenerationError("x"),
                                   RequestCancelledError("x")])
def test_every_project_error_travels_with_its_code_and_param(error: TritonVLMError) -> None:
    assert error.code == error.triton_code and error.code in CODES
    assert decode_error(encode_error(error.code, str(error), error.param)) == WireError(error.code, "x", error.param)


@pytest.mark.parametrize("message", [
    "generation failed: RuntimeError: boom",  # Triton's own, or anything not encoded
    "INVALID_ARG: the old tag is no encoding",
    "[invalid_arg] lower case is no code",
    "[INVALID_ARG]no space after the bracket",
    "[FORBIDDEN] not one of the codes",
    " [INVALID_ARG] leading space",
    "[INVALID_ARG param=] empty param",
    "[INVALID_ARG param=a b] two words",
    "",
])
def test_messages_that_are_not_encoded_decode_to_none(message: str) -> None:
    assert decode_error(message) is None


def test_encoding_is_lenient_while_answering_a_request() -> None:
    """It runs inside the backend's error path: a wrong code or field must not fail the answer itself."""
    assert decode_error(encode_error("NO_SUCH_CODE", "x")) == WireError("INTERNAL", "x")
    assert decode_error(encode_error("INVALID_ARG", "x", "not a name")) == WireError("INVALID_ARG", "x")


def test_only_the_first_encoding_is_read_and_multiline_messages_survive() -> None:
    assert decode_error("[UNAVAILABLE] [NOT_FOUND] nested") == WireError("UNAVAILABLE", "[NOT_FOUND] nested")
    assert decode_error("[INVALID_ARG param=prompt] line one\nline two") == WireError(
        "INVALID_ARG", "line one\nline two", "prompt")
    assert decode_error("[CANCELLED] ") == WireError("CANCELLED", "")


@given(st.sampled_from(CODES), st.text(max_size=40),
       st.none() | st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True))
def test_round_trip_property(code: str, message: str, param: str | None) -> None:
    assert decode_error(encode_error(code, message, param)) == WireError(code, message, param)


# -- the logprobs and choices wire format ------------------------------------------------------------------------
_texts = st.text(max_size=8)  # any text: a token's own text may be a lone space, a broken byte (U+FFFD), "\"", ...
_floats = st.floats(allow_nan=False, allow_infinity=False)
_tops = st.builds(TopLogprob, st.integers(0, 2**31 - 1), _texts, _floats)
_entries = st.lists(st.builds(TokenLogprob, st.integers(0, 2**31 - 1), _texts, _floats,
                              st.lists(_tops, max_size=3).map(tuple)), max_size=4).map(tuple)
_choices = st.lists(st.builds(Choice, st.integers(1, 7), st.text(max_size=20),
                              st.sampled_from(["stop", "length"]), st.integers(0, 4096), _entries), max_size=3)


@given(_entries)
def test_logprobs_round_trip(entries: tuple[TokenLogprob, ...]) -> None:
    encoded = encode_logprobs(entries)
    assert (encoded == "") == (not entries)  # "" unless asked (and a piece without tokens carries none)
    assert decode_logprobs(encoded) == entries


@given(_choices)
def test_choices_round_trip(choices: list[Choice]) -> None:
    encoded = encode_choices(choices)
    assert (encoded == "") == (not choices)
    assert decode_choices(encoded) == tuple(choices)


def test_the_logprobs_and_choices_json_is_the_contract_s() -> None:
    """The shapes docs/contract.md documents for ``token_logprobs`` and ``choices``, key for key."""
    entry = TokenLogprob(7, "cat", -0.25, (TopLogprob(7, "cat", -0.25), TopLogprob(9, " dog", -1.5)))
    as_json = {"id": 7, "token": "cat", "logprob": -0.25,
               "top": [{"id": 7, "token": "cat", "logprob": -0.25}, {"id": 9, "token": " dog", "logprob": -1.5}]}
    assert json.loads(encode_logprobs([entry])) == [as_json]
    choices = [Choice(1, "A cat.", "stop", 3, (entry,)), Choice(2, "A", "length", 1)]
    assert json.loads(encode_choices(choices)) == [
        {"index": 1, "text": "A cat.", "finish_reason": "stop", "generated_tokens": 3, "logprobs": [as_json]},
        {"index": 2, "text": "A", "finish_reason": "length", "generated_tokens": 1, "logprobs": None}]
    assert decode_logprobs("") == decode_logprobs(None) == decode_choices("") == decode_choices(None) == ()


# -- request tensors ---------------------------------------------------------------------------------------------
ALL_FIELDS = RequestFields(image=b"\x89PNG....", prompt="Qu'est-ce ? 🐱", max_tokens=7, temperature=0.5, top_p=0.9,
                           seed=2**62, ignore_eos=True, task="caption:short", stream=False)
TRITON_TYPES = {"image": "UINT8", "prompt": "BYTES", "max_tokens": "INT32", "temperature": "FP32", "top_p": "FP32",
                "seed": "INT64", "ignore_eos": "BOOL", "task": "BYTES", "stream": "BOOL"}


def test_request_arrays_have_the_model_s_dtypes_and_a_batch_of_one() -> None:
    arrays = dict(ALL_FIELDS.arrays())
    assert list(arrays) == list(TRITON_TYPES)
    assert arrays["image"].dtype == np.uint8 and arrays["image"].tobytes() == ALL_FIELDS.image
    assert arrays["prompt"][0, 0] == ALL_FIELDS.prompt.encode("utf-8") and arrays["task"][0, 0] == b"caption:short"
    expected = {"max_tokens": (np.int32, 7), "temperature": (np.float32, 0.5), "top_p": (np.float32, np.float32(0.9)),
                "seed": (np.int64, 2**62), "ignore_eos": (np.bool_, True), "stream": (np.bool_, False)}
    for name, (dtype, value) in expected.items():
        assert arrays[name].dtype == dtype and arrays[name].tolist() == [[value]], name
    assert all(array.shape[0] == 1 and array.ndim == 2 for array in arrays.values())


def test_optional_fields_left_at_none_are_not_sent() -> None:
    assert [name for name, _ in RequestFields(image=b"x", prompt="hi").arrays()] == ["image", "prompt"]
    assert [name for name, _ in RequestFields(image=b"x", prompt="", seed=0, stream=False).arrays()] == [
        "image", "prompt", "seed", "stream"]  # 0 and False are values, not "unset"


@pytest.mark.parametrize("api", ["http", "grpc", "http.aio", "grpc.aio"])
def test_chat_fields_send_messages_and_one_bytes_element_per_image(api: Any) -> None:
    """The chat form: ``messages`` (BYTES [1, 1]) and ``images`` (BYTES [1, n], each a whole file, even ones that
    end in NUL bytes, which numpy's fixed-width bytes would strip); never ``image`` or ``prompt``."""
    files = (b"\x89PNG\x00\x00", b"GIF89a", b"\xff\xd8" * 3)
    fields = RequestFields(messages='[{"role": "user", "content": "🐱"}]', images=files, max_tokens=3)
    arrays = dict(fields.arrays())
    assert list(arrays) == ["messages", "images", "max_tokens"]
    assert arrays["images"].dtype == np.object_ and arrays["images"].shape == (1, 3)
    assert tuple(arrays["images"][0]) == files
    assert arrays["messages"][0, 0].decode("utf-8") == fields.messages
    inputs = {t.name(): t for t in request_inputs(api, fields)}
    assert {name: (t.datatype(), t.shape()) for name, t in inputs.items()} == {
        "messages": ("BYTES", [1, 1]), "images": ("BYTES", [1, 3]), "max_tokens": ("INT32", [1, 1])}
    assert [n for n, _ in RequestFields(messages="[]").arrays()] == ["messages"]  # no images: a text-only chat


@pytest.mark.parametrize("api", ["http", "grpc", "http.aio", "grpc.aio"])
def test_request_inputs_for_each_client_module(api: Any) -> None:
    inputs = request_inputs(api, ALL_FIELDS)
    assert {t.name(): t.datatype() for t in inputs} == TRITON_TYPES
    assert {t.name(): t.shape() for t in inputs}["image"] == [1, len(ALL_FIELDS.image)]
    assert [o.name() for o in requested_outputs(api, ["generated_text", "entities"])] == ["generated_text", "entities"]


# -- outputs -----------------------------------------------------------------------------------------------------
class FakeResult:
    """A tritonclient ``InferResult`` (and, for streams, its response's outputs and Triton's final flag)."""

    def __init__(self, arrays: dict[str, np.ndarray], final: bool = False) -> None:
        self.arrays = arrays
        self.response = types.SimpleNamespace(
            outputs=list(arrays), parameters={"triton_final_response": types.SimpleNamespace(bool_param=final)})

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)

    def get_response(self) -> Any:
        return self.response


def answer(text: str, tokens: int, finish: str = "", *, final: bool | None = None,
           entities: str | None = None, index: int | None = None, cached: int | None = None) -> FakeResult:
    arrays = {"generated_text": np.array([[text.encode()]], dtype=object), "generated_tokens": np.array([[tokens]]),
              "prompt_tokens": np.array([[12]], dtype=np.int32), "finish_reason": np.array([[finish.encode()]],
                                                                                            dtype=object)}
    if entities is not None:
        arrays["entities"] = np.array([[entities.encode()]], dtype=object)
    if index is not None:
        arrays["index"] = np.array([[index]], dtype=np.int32)
    if cached is not None:
        arrays["cached_tokens"] = np.array([[cached]], dtype=np.int32)
    return FakeResult(arrays, final=bool(finish) if final is None else final)


EMPTY_FINAL = FakeResult({}, final=True)


def test_parse_output_binary_and_json_answers() -> None:
    assert parse_output(answer("A cat.", 3, "stop")) == Output("A cat.", 3, 12, "stop")
    grounded = parse_output(answer("a snowman", 4, "length", entities='[{"phrase": "a snowman"}]'))
    assert grounded.entities == '[{"phrase": "a snowman"}]' and grounded.finish_reason == "length"
    as_json = FakeResult({"generated_text": np.array(["A dog."], dtype=object), "generated_tokens": np.array([2]),
                          "prompt_tokens": np.array([5]), "finish_reason": np.array(["stop"], dtype=object)})
    assert parse_output(as_json) == Output("A dog.", 2, 5, "stop")  # HTTP JSON answers hold str, not bytes


def test_parse_output_reads_logprobs_choices_and_index() -> None:
    entries = (TokenLogprob(3, "A", -0.5, (TopLogprob(3, "A", -0.5),)),)
    choices = (Choice(1, "B.", "stop", 2, entries), Choice(2, "C", "length", 1))
    result = answer("A.", 2, "stop")
    result.arrays.update(token_logprobs=np.array([[encode_logprobs(entries).encode()]], dtype=object),
                         choices=np.array([[encode_choices(choices).encode()]], dtype=object),
                         index=np.array([[0]], dtype=np.int32))
    assert parse_output(result) == Output("A.", 2, 12, "stop", logprobs=entries, choices=choices)


def test_stream_model_names_and_statistics() -> None:
    assert stream_model("llava") == "llava_stream" and stream_model("llava_stream") == "llava_stream"
    stats = {"model_stats": [{"name": "llava", "version": "1"}]}
    assert statistics_models(stats) == [("llava", "1")]
    message = types.SimpleNamespace(model_stats=[types.SimpleNamespace(name="kosmos2", version="2")])
    assert statistics_models(message) == [("kosmos2", "2")]


# -- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code, param, kind", [
    ("INVALID_ARG", "image", InvalidInputError), ("INVALID_ARG", "max_tokens", InvalidInputError),
    ("UNAVAILABLE", None, ModelUnavailableError), ("NOT_FOUND", None, UnknownModelError),
    ("CANCELLED", None, RequestCancelledError), ("INTERNAL", None, GenerationError),
    ("UNSUPPORTED", None, GenerationError),
])
@pytest.mark.parametrize("status", [None, "400", "StatusCode.INTERNAL"])  # a stream has none; BLS says INTERNAL
def test_the_backend_s_errors_are_decoded_by_code_not_by_text(code: str, param: str | None, kind: type,
                                                               status: str | None) -> None:
    message = "max_tokens must be in [1, 1024], got 0"  # text that names a field decides nothing
    error = translate(InferenceServerException(encode_error(code, message, param), status=status),
                      model="llava_stream", url="h:1")
    assert type(error) is kind and str(error) == message  # the message users read stays clean
    assert (error.code, error.param, error.model) == (code, param, "llava_stream")


@pytest.mark.parametrize("exc, kind", [
    (TimeoutError("timed out"), RequestTimeoutError),
    (asyncio.TimeoutError(), RequestTimeoutError),
    (ConnectionRefusedError(111, "Connection refused"), ServerUnreachableError),
    (IncompleteRead(b"{\"outp"), ConnectionLostError),  # geventhttpclient's: the server hung up mid-answer
    (InvalidInputError("image: empty", param="image"), InvalidInputError),
])
def test_transport_errors(exc: BaseException, kind: type) -> None:
    error = translate(exc, model="llava", url="h:1", timeout=3.0)
    assert type(error) is kind
    if isinstance(exc, TritonVLMError):
        assert error is exc
    else:
        assert "h:1" in str(error) and error.model == "llava"


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code, details, kind", [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", ServerUnreachableError),
    (grpc.StatusCode.UNAVAILABLE, "Socket closed", ConnectionLostError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", RequestTimeoutError),
    (grpc.StatusCode.CANCELLED, "Locally cancelled", RequestCancelledError),
    (grpc.StatusCode.INTERNAL, encode_error("INVALID_ARG", "prompt: empty", "prompt"), InvalidInputError),
])
def test_grpc_call_errors(code: grpc.StatusCode, details: str, kind: type) -> None:
    error = translate(RpcError(code, details), model="llava", url="h:1")
    assert type(error) is kind and error.model == "llava"


def test_an_unknown_exception_is_not_translated() -> None:
    """A bug must surface as itself, not as a server error."""
    assert translate(KeyError("oops"), model=None, url="h:1") is None


# -- the stream loops --------------------------------------------------------------------------------------------
PIECES = [answer("A", 1), answer(" cat", 2), answer(".", 3, "stop")]
CALL = StreamCall("llava_stream", inputs=[])


class SyncClient:
    """``tritonclient.grpc.InferenceServerClient``'s stream API: the script's responses reach the callback from
    another thread, as the real stream's handler thread delivers them."""

    def __init__(self, script: list[tuple[Any, Any]]) -> None:
        self.script = script
        self.stopped: list[bool] = []  # cancel_requests of each stop_stream
        self.asked: dict[str, Any] = {}

    def start_stream(self, callback: Any, stream_timeout: float | None = None) -> None:
        self.callback = callback

    def async_stream_infer(self, model: str, inputs: list[Any], outputs: Any = None,
                           enable_empty_final_response: bool = False) -> None:
        self.asked = {"model": model, "empty_final": enable_empty_final_response}

        def deliver() -> None:
            for result, error in self.script:
                self.callback(result=result, error=error)

        threading.Thread(target=deliver, daemon=True).start()

    def stop_stream(self, cancel_requests: bool = False) -> None:
        self.stopped.append(cancel_requests)


def test_sync_stream_yields_every_piece_and_does_not_cancel_a_finished_request() -> None:
    client = SyncClient([(r, None) for r in PIECES])
    outputs = list(outputs_sync(client, CALL, url="h:1", timeout=5))
    assert "".join(o.text for o in outputs) == "A cat." and outputs[-1].finish_reason == "stop"
    assert client.stopped == [False] and client.asked == {"model": "llava_stream", "empty_final": True}


def test_sync_stream_left_early_is_cancelled() -> None:
    client = SyncClient([(r, None) for r in PIECES])
    outputs = outputs_sync(client, CALL, url="h:1", timeout=5)
    assert next(outputs).text == "A"
    outputs.close()
    assert client.stopped == [True]


def test_sync_stream_error_response_is_raised_typed_and_ends_the_request() -> None:
    error = InferenceServerException(msg=encode_error("INVALID_ARG", "image: empty", "image"))
    client = SyncClient([(PIECES[0], None), (None, error)])
    outputs = outputs_sync(client, CALL, url="h:1", timeout=5)
    next(outputs)
    with pytest.raises(InvalidInputError) as info:
        next(outputs)
    assert str(info.value) == "image: empty" and info.value.param == "image"
    assert client.stopped == [False]  # nothing left to cancel


def test_sync_stream_that_ends_without_an_answer_is_cancelled_error() -> None:
    """An engine abort sends only the final flag: the loop ends on it (not yielded) and no answer came."""
    client = SyncClient([(PIECES[0], None), (EMPTY_FINAL, None)])
    raw = list(stream_sync(SyncClient([(PIECES[0], None), (EMPTY_FINAL, None)]), CALL, url="h:1", timeout=5))
    assert raw == [PIECES[0]]
    with pytest.raises(RequestCancelledError, match="without an answer"):
        list(outputs_sync(client, CALL, url="h:1", timeout=5))
    assert client.stopped == [False]


#: A stream of n=2: the choices' pieces interleaved; choice 1 ends first (not FINAL), choice 0 last (FINAL).
N_PIECES = [answer("A", 1, index=0), answer("B", 1, index=1), answer(" b.", 2, "stop", final=False, index=1, cached=0),
            answer(" a", 2, "length", index=0, cached=32)]
N_CALL = StreamCall("llava_stream", inputs=[], choices=2)


def test_a_stream_of_n_choices_ends_once_every_choice_had_its_finish_reason() -> None:
    outputs = list(outputs_sync(SyncClient([(r, None) for r in N_PIECES]), N_CALL, url="h:1", timeout=5))
    assert [(o.index, o.text, o.finish_reason) for o in outputs] == [(0, "A", ""), (1, "B", ""), (1, " b.", "stop"),
                                                                     (0, " a", "length")]
    assert [o.cached_tokens for o in outputs] == [0, 0, 0, 32]
    # Aborted after choice 1 ended: only the final flag follows, and choice 0 never had its finish reason.
    aborted = SyncClient([*((r, None) for r in N_PIECES[:3]), (EMPTY_FINAL, None)])
    with pytest.raises(RequestCancelledError, match="without an answer"):
        list(outputs_sync(aborted, N_CALL, url="h:1", timeout=5))

    async def stream(script: list[Any]) -> list[Output]:
        return [o async for o in outputs_async(AsyncClient(script), N_CALL, url="h:1", timeout=5)]

    assert [o.text for o in run(stream([(r, None) for r in N_PIECES]))] == ["A", "B", " b.", " a"]
    # A whole answer of n=2 ends both choices in its one response (the further one in ``choices``).
    whole = answer("A a", 2, "length", index=0)
    whole.arrays["choices"] = np.array([[encode_choices([Choice(1, "B b.", "stop", 2)]).encode()]], dtype=object)
    assert len(list(outputs_sync(SyncClient([(whole, None)]), N_CALL, url="h:1", timeout=5))) == 1


def test_sync_stream_silent_past_the_timeout_is_a_timeout_and_is_cancelled() -> None:
    client = SyncClient([(PIECES[0], None)])
    with pytest.raises(RequestTimeoutError, match="no response from llava_stream in 0.2s"):
        list(outputs_sync(client, CALL, url="h:1", timeout=0.2))
    assert client.stopped == [True]


class AsyncClient:
    """``tritonclient.grpc.aio.InferenceServerClient.stream_infer``: the script's responses, then, as Triton does,
    the end of the stream once the request side has closed. Records cancels and whether the end was read."""

    def __init__(self, script: list[Any], end_after: float = 0.0) -> None:
        self.script = script
        self.cancelled = 0
        self.read_to_end = False
        self.sent: list[dict[str, Any]] = []
        #: How long the server takes to end the stream once the request side closed.
        self.end_after = end_after

    def stream_infer(self, requests: AsyncIterator[dict[str, Any]], stream_timeout: float | None = None) -> Any:
        client = self

        class Responses:
            def __init__(self) -> None:
                self.items = iter(client.script)

            def __aiter__(self) -> Responses:
                return self

            async def __anext__(self) -> tuple[Any, Any]:
                if not client.sent:
                    client.sent.append(await requests.__anext__())
                item = next(self.items, None)
                if item is None:
                    async for _ in requests:  # the request side closes once the loop is done
                        pass
                    await asyncio.sleep(client.end_after)
                    client.read_to_end = True
                    raise StopAsyncIteration
                if isinstance(item, BaseException):
                    raise item
                if item == "hang":
                    await asyncio.Event().wait()
                return item

            def cancel(self) -> None:
                client.cancelled += 1

        return Responses()


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def collect(client: AsyncClient, timeout: float | None = 5, limit: int | None = None) -> list[Output]:
    outputs = outputs_async(client, CALL, url="h:1", timeout=timeout)
    got: list[Output] = []
    try:
        async for output in outputs:
            got.append(output)
            if limit is not None and len(got) == limit:
                break
    finally:
        await outputs.aclose()
    return got


def test_async_stream_reads_a_finished_request_s_stream_to_its_end_without_cancelling() -> None:
    client = AsyncClient([(r, None) for r in PIECES])
    outputs = run(collect(client))
    assert "".join(o.text for o in outputs) == "A cat." and client.sent[0]["model_name"] == "llava_stream"
    # Read to the end: grpc would cancel a call that is collected before it ended, the race the rule avoids.
    assert client.cancelled == 0 and client.read_to_end


def test_a_caller_cancelled_while_a_finished_stream_ends_leaves_it_to_end() -> None:
    """The OpenAI front's streamed answer: its last piece out, the HTTP client leaves, and the task that closes the
    stream is cancelled while the stream ends. That must not cancel the call as its request ends (Triton 2.51 then
    never releases the request, and its model never unloads): the stream is still read to its end."""
    client = AsyncClient([(r, None) for r in PIECES], end_after=0.2)

    async def leave_after_the_last_piece() -> None:
        outputs = outputs_async(client, CALL, url="h:1", timeout=5)
        async for output in outputs:
            if output.finish_reason:
                break  # as the front's events do: done once every choice had its finish reason
        closing = asyncio.ensure_future(outputs.aclose())
        await asyncio.sleep(0.05)  # the stream is ending
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await asyncio.sleep(0.3)

    run(leave_after_the_last_piece())
    assert client.read_to_end and client.cancelled == 0


def test_async_stream_left_early_or_cancelled_is_cancelled() -> None:
    client = AsyncClient([(r, None) for r in PIECES])
    assert [o.text for o in run(collect(client, limit=1))] == ["A"]
    assert client.cancelled == 1

    hanging = AsyncClient([(PIECES[0], None), "hang"])

    async def leave_while_waiting() -> None:
        task = asyncio.ensure_future(collect(hanging))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(leave_while_waiting())
    assert hanging.cancelled == 1


def test_async_stream_errors() -> None:
    encoded = InferenceServerException(msg=encode_error("UNAVAILABLE", "overloaded: 3 requests (limit 2)"))
    client = AsyncClient([(None, encoded)])
    with pytest.raises(ModelUnavailableError) as info:
        run(collect(client))
    assert str(info.value) == "overloaded: 3 requests (limit 2)" and info.value.code == "UNAVAILABLE"
    assert client.cancelled == 0  # an error response ends the request: nothing to cancel

    broken = AsyncClient([RpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")])
    with pytest.raises(ServerUnreachableError):
        run(collect(broken))
    assert broken.cancelled == 1

    buggy = AsyncClient([RuntimeError("a bug")])
    with pytest.raises(RuntimeError, match="a bug"):  # propagates as itself
        run(collect(buggy))


def test_async_stream_timeout_and_an_answerless_end() -> None:
    silent = AsyncClient(["hang"])
    with pytest.raises(RequestTimeoutError, match="no response from llava_stream in 0.1s"):
        run(collect(silent, timeout=0.1))
    assert silent.cancelled == 1
    aborted = AsyncClient([(PIECES[0], None), (EMPTY_FINAL, None)])
    with pytest.raises(RequestCancelledError):
        run(collect(aborted))
    assert aborted.cancelled == 0

    async def raw() -> list[Any]:
        return [r async for r in stream_async(AsyncClient([(PIECES[0], None), (EMPTY_FINAL, None)]), CALL,
                                              url="h:1")]

    assert run(raw()) == [PIECES[0]]  # the empty final response only ends the loop


def test_entities_ride_on_the_last_piece() -> None:
    entities = json.dumps([{"phrase": "a cat", "span": [0, 5], "boxes": []}])
    client = AsyncClient([(answer("A cat", 2), None), (answer(".", 3, "stop", entities=entities), None)])
    outputs = run(collect(client))
    assert [o.entities for o in outputs] == [None, entities]

