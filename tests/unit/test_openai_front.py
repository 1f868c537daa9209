"""The OpenAI-compatible front without Triton: message rules, images, keys, limits, streaming and errors, through
FastAPI's test client and a fake gateway."""

from __future__ import annotations

import asyncio
import base64
import hmac
import http.server
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from triton_vlm._protocol.wire import Choice, encode_choices
from triton_vlm.errors import (
    GenerationError,
    InvalidInputError,
    ModelUnavailableError,
    RequestTimeoutError,
    ServerUnreachableError,
    UnknownModelError,
)
from triton_vlm.openai import OpenAIOptions, load_api_keys
from triton_vlm.openai.app import create_app
from triton_vlm.openai.config import OpenAIConfigError
from triton_vlm.openai.errors import APIError, from_triton
from triton_vlm.openai.images import decode_data_uri, fetch_image, image_bytes, is_public_address
from triton_vlm.openai.messages import ImageRef, conversation
from triton_vlm.openai.schemas import ChatCompletionRequest
from triton_vlm.openai.triton import ChatInput, Piece, Sampling, ServedModel

KEY = "sk-unit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _png(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
#: What the gateway decodes from kosmos2's entities output.
ENTITIES = [{"phrase": "a snowman", "span": [11, 20], "boxes": [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.5, "y_max": 0.9}],
             "boxes_px": [{"x_min": 0.8, "y_min": 1.6, "x_max": 4.0, "y_max": 7.2}]}]
DATA_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()


#: What ``<model>_stream`` streams for n=3: the choices' pieces interleaved, each choice's last with its finish
#: reason (choice 1 ends first, with "stop"); counts are each choice's own; cached_tokens on each choice's last piece.
N_PIECES = [Piece("A", 40, 1, "", index=0), Piece("B", 40, 1, "", index=1), Piece("C", 40, 1, "", index=2),
            Piece(" b.", 40, 2, "stop", index=1, cached_tokens=32), Piece(" a", 40, 2, "", index=0),
            Piece(" c", 40, 2, "", index=2), Piece(".", 40, 3, "length", index=0, cached_tokens=16),
            Piece(" c.", 40, 4, "length", index=2, cached_tokens=32)]


class FakeGateway:
    """Answers like Triton would; records every call."""

    def __init__(self) -> None:
        #: (kind, model, the first image or b"", the last user message's text, sampling); ``inputs``: each call's.
        self.calls: list[tuple[str, str, bytes, str, Sampling]] = []
        self.inputs: list[ChatInput] = []
        self.fail: Exception | None = None
        self.fail_after_pieces: Exception | None = None
        self.hold: threading.Event | None = None
        self.closed_streams = 0
        self.cancelled = 0
        self.asked_entities: list[bool] = []

    async def ready(self) -> bool:
        return True

    async def models(self, refresh: bool = False) -> dict[str, ServedModel]:
        return {"llava": ServedModel("llava", True), "kosmos2": ServedModel("kosmos2", False, entities=True),
                "moondream2": ServedModel("moondream2", False, tasks=True)}

    async def _maybe_wait(self) -> None:
        while self.hold is not None and not self.hold.is_set():
            await asyncio.sleep(0.01)

    def _record(self, kind: str, model: str, chat: ChatInput, sampling: Sampling) -> None:
        last = json.loads(chat.messages)[-1]["content"]
        text = last if isinstance(last, str) else "\n".join(p["text"] for p in last if p["type"] == "text")
        self.calls.append((kind, model, chat.images[0] if chat.images else b"", text, sampling))
        self.inputs.append(chat)

    async def infer(self, model: str, chat: ChatInput, sampling: Sampling, *, entities: bool = False) -> Piece:
        self._record("infer", model, chat, sampling)
        self.asked_entities.append(entities)
        try:
            await self._maybe_wait()
        except asyncio.CancelledError:  # what a real gRPC call turns into a cancelled Triton request
            self.cancelled += 1
            raise
        if self.fail:
            raise self.fail
        # n > 1: the whole answer's further choices, as the batched loop answers them.
        choices = tuple(Choice(i, f"Answer {i}.", "stop", i + 1) for i in range(1, sampling.n or 1))
        return Piece("The answer.", 40, 3, "stop", entities=ENTITIES if entities else None, cached_tokens=32,
                     choices=choices)

    async def stream(self, model: str, chat: ChatInput, sampling: Sampling, *,
                     entities: bool = False) -> AsyncIterator[Piece]:
        self._record("stream", model, chat, sampling)
        self.asked_entities.append(entities)
        try:
            if self.fail:
                raise self.fail
            if (sampling.n or 1) > 1:
                for piece in N_PIECES:
                    yield piece
                return
            for i, word in enumerate(["The", " answer", "."]):
                if i == 2 and self.fail_after_pieces:
                    raise self.fail_after_pieces
                last = i == 2
                yield Piece(word, 40, i + 1, "length" if last else "", entities=ENTITIES if entities and last else None,
                            cached_tokens=16 if last else 0)
        finally:
            self.closed_streams += 1

    async def close(self) -> None:
        pass


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


def make_client(gateway: FakeGateway, **options: Any) -> TestClient:
    return TestClient(create_app(OpenAIOptions(**{"api_keys": (KEY,), **options}), gateway))


@pytest.fixture
def client(gateway: FakeGateway) -> Iterator[TestClient]:
    with make_client(gateway) as test_client:
        yield test_client


def user(text: str = "What is this?", *urls: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}


def chat(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "llava", "messages": [user("Hi", DATA_URI)], **body},
                       headers=AUTH)


def events(text: str) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


# -- messages -----------------------------------------------------------------------------------------------
def _messages(*messages: dict[str, Any]) -> Any:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": list(messages)}).messages


def test_the_conversation_goes_as_messages_with_image_parts_where_the_images_stood() -> None:
    parsed = conversation(_messages({"role": "user", "content": [
        {"type": "text", "text": "What is"}, {"type": "image_url", "image_url": {"url": DATA_URI}},
        {"type": "text", "text": "in it?"}]}))
    assert json.loads(parsed.messages) == [{"role": "user", "content": [
        {"type": "text", "text": "What is"}, {"type": "image"}, {"type": "text", "text": "in it?"}]}]
    assert parsed.images == (ImageRef(DATA_URI, "messages[0].content[1].image_url.url"),)


def test_system_turns_earlier_turns_and_images_in_order() -> None:
    other = DATA_URI + "AA"
    parsed = conversation(_messages(
        {"role": "system", "content": "Be brief."}, {"role": "developer", "content": [{"type": "text", "text": "No"
                                                                                       " lists."}]},
        user("What is this?", DATA_URI), {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        {"role": "assistant", "content": None}, user("And these?", other, DATA_URI),
        {"role": "user", "content": "What colour?"}))
    assert json.loads(parsed.messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "No lists."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "And these?"}, {"type": "image"}, {"type": "image"}]},
        {"role": "user", "content": "What colour?"}]
    assert [(ref.url, ref.param) for ref in parsed.images] == [
        (DATA_URI, "messages[2].content[1].image_url.url"), (other, "messages[5].content[1].image_url.url"),
        (DATA_URI, "messages[5].content[2].image_url.url")]


def test_text_only_chats_have_no_images() -> None:
    parsed = conversation(_messages({"role": "user", "content": "Hi"}))
    assert json.loads(parsed.messages) == [{"role": "user", "content": "Hi"}] and parsed.images == ()


@pytest.mark.parametrize("messages, code, param", [
    ([user("Hi", DATA_URI), {"role": "assistant", "content": "Yes"}], None, "messages[1].role"),
    ([{"role": "tool", "content": "42", "tool_call_id": "c1"}, user("Hi", DATA_URI)], "unsupported_value",
     "messages[0].role"),
    ([{"role": "assistant", "tool_calls": [{"id": "c1"}]}, user("Hi", DATA_URI)], "unsupported_value",
     "messages[0].tool_calls"),
])
def test_message_rules_are_400s(messages: list[dict[str, Any]], code: str | None, param: str) -> None:
    with pytest.raises(APIError) as error:
        conversation(_messages(*messages))
    assert error.value.status == 400 and error.value.code == code and error.value.param == param


# -- images ---------------------------------------------------------------------------------------------------
def test_data_uris() -> None:
    encoded = base64.b64encode(PNG).decode()
    spaced = "\n".join(encoded[i:i + 10] for i in range(0, len(encoded), 10))
    assert decode_data_uri(f"data:image/png;base64,{spaced}", max_bytes=10**6, param="p") == PNG
    assert decode_data_uri(f"data:;base64,{encoded}", max_bytes=10**6, param="p") == PNG
    assert decode_data_uri("data:application/octet-stream,%89PNG", max_bytes=10**6, param="p") == b"\x89PNG"
    for bad, code in (("data:text/plain;base64,aGk=", "invalid_image_url"), ("data:image/png;base64",
                                                                           "invalid_image_url"),
                      ("data:image/png;base64,***", "invalid_image_url"), ("data:image/png;base64,",
                                                                           "invalid_image_url")):
        with pytest.raises(APIError) as error:
            decode_data_uri(bad, max_bytes=10**6, param="p")
        assert (error.value.status, error.value.code, error.value.param) == (400, code, "p"), bad
    with pytest.raises(APIError) as error:
        decode_data_uri(f"data:image/png;base64,{encoded}", max_bytes=len(PNG) - 1, param="p")
    assert error.value.status == 413 and error.value.code == "image_too_large"
    with pytest.raises(APIError) as error:  # refused from its length, before decoding
        decode_data_uri("data:image/png;base64," + "A" * 4000, max_bytes=100, param="p")
    assert error.value.status == 413


@pytest.mark.parametrize("url, code", [
    ("https://example.com/cat.png", "remote_images_disabled"), ("http://10.0.0.1/x.png", "remote_images_disabled"),
    ("file:///etc/passwd", "invalid_image_url"), ("ftp://example.com/x.png", "invalid_image_url"),
    ("just text", "invalid_image_url"),
])
def test_only_data_uris_unless_remote_images_are_allowed(url: str, code: str) -> None:
    with pytest.raises(APIError) as error:
        asyncio.run(image_bytes(url, param="p", max_bytes=10**6, allow_remote=False, allow_private=False,
                                timeout_s=1))
    assert error.value.status == 400 and error.value.code == code


def test_public_addresses() -> None:
    assert is_public_address("93.184.216.34") and is_public_address("2606:2800:220:1::1")
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fe80::1", "0.0.0.0",
                    "100.64.0.1", "::ffff:127.0.0.1", "224.0.0.1", "fd00::1"):
        assert not is_public_address(address), address


class _ImageServer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/cat.png":
            self._send(200, PNG)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/big":
            self._send(200, b"\0" * 5000)
        elif self.path == "/big-chunked":  # no Content-Length: the limit applies while reading
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\0" * 5000)
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG)
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _fetch(url: str, *, allow_private: bool = True, max_bytes: int = 4000, timeout_s: float = 5) -> bytes:
    return asyncio.run(fetch_image(url, max_bytes=max_bytes, timeout_s=timeout_s, allow_private=allow_private,
                                   param="p"))


def test_remote_images_with_limits(image_server: str) -> None:
    assert _fetch(f"{image_server}/cat.png") == PNG
    assert _fetch(f"{image_server}/redirect") == PNG
    for path, status, code in (("/big", 413, "image_too_large"), ("/big-chunked", 413, "image_too_large"),
                               ("/missing", 400, "image_fetch_failed"), ("/loop", 400, "image_fetch_failed"),
                               ("/to-file", 400, "image_url_forbidden")):
        with pytest.raises(APIError) as error:
            _fetch(image_server + path)
        assert (error.value.status, error.value.code) == (status, code), path
    started = time.monotonic()
    with pytest.raises(APIError, match="longer than 0.5 s"):
        _fetch(f"{image_server}/slow", timeout_s=0.5)
    assert time.monotonic() - started < 1.4


def test_remote_images_refuse_private_addresses_by_default(image_server: str) -> None:
    port = image_server.rsplit(":", 1)[1]
    for url in (f"{image_server}/cat.png", f"http://localhost:{port}/cat.png", f"http://[::1]:{port}/cat.png"):
        with pytest.raises(APIError) as error:
            _fetch(url, allow_private=False)
        assert (error.value.status, error.value.code) == (400, "image_url_forbidden"), url
        assert "non-public" in error.value.message or "not a public address" in error.value.message


def test_remote_images_through_the_app(gateway: FakeGateway, image_server: str) -> None:
    with make_client(gateway, allow_remote_images=True, allow_private_image_hosts=True) as client:
        response = client.post("/v1/chat/completions", headers=AUTH, json={
            "model": "llava", "messages": [user("Hi", f"{image_server}/cat.png")]})
        assert response.status_code == 200 and gateway.calls[-1][2] == PNG
    with make_client(gateway, allow_remote_images=True) as client:
        response = client.post("/v1/chat/completions", headers=AUTH, json={
            "model": "llava", "messages": [user("Hi", f"{image_server}/cat.png")]})
        assert response.status_code == 400 and response.json()["error"]["code"] == "image_url_forbidden"


# -- keys -----------------------------------------------------------------------------------------------------
def test_api_keys_from_flag_environment_and_file(tmp_path: Any) -> None:
    assert load_api_keys("k1", env={}) == ("k1",)
    assert load_api_keys(env={"TRITON_VLM_API_KEY": "k1, k2"}) == ("k1", "k2")
    keys = tmp_path / "keys"
    keys.write_text("# team A\nk3\n\n  k4  \nk3\n")
    assert load_api_keys(key_file=keys, env={}) == ("k3", "k4")
    assert load_api_keys(env={"TRITON_VLM_API_KEY_FILE": str(keys)}) == ("k3", "k4")
    assert load_api_keys("k1", keys, env={"TRITON_VLM_API_KEY": "ignored"}) == ("k1", "k3", "k4")
    assert load_api_keys(env={}) == ()
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(OpenAIConfigError, match="holds no key"):
        load_api_keys(key_file=tmp_path / "empty", env={})
    with pytest.raises(OpenAIConfigError, match="cannot read"):
        load_api_keys(key_file=tmp_path / "missing", env={})
    (tmp_path / "bad").write_text("good\nsecret with space\n")
    with pytest.raises(OpenAIConfigError, match="line 2") as error:
        load_api_keys(key_file=tmp_path / "bad", env={})
    assert "secret" not in str(error.value)
    assert "sk-hidden" not in repr(OpenAIOptions(api_keys=("sk-hidden",)))


def test_keys_are_compared_in_constant_time(gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Any) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with make_client(gateway, api_keys=("first-key", "second-key")) as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer second-key"}).status_code == 200
        assert compared == [(b"second-key", b"first-key"), (b"second-key", b"second-key")]  # every key, always
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic Zmlyc3Qta2V5"},
                        {"Authorization": "Bearer first-key2"}, {"Authorization": "Bearer \u00e9".encode("latin-1")}):
            response = client.get("/v1/models", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/health").status_code == 200 and client.get("/health/ready").status_code == 200


def test_without_keys_everything_is_open(gateway: FakeGateway) -> None:
    with TestClient(create_app(OpenAIOptions(), gateway)) as client:
        assert client.get("/v1/models").status_code == 200
        assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


# -- chat -----------------------------------------------------------------------------------------------------
def test_chat_answer_and_what_reaches_triton(client: TestClient, gateway: FakeGateway) -> None:
    response = chat(client, max_tokens=7, temperature=0.5, top_p=0.8, seed=3, user="ignored", unknown_field=1)
    assert response.status_code == 200
    body = response.json()
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "The answer.",
                                                        "refusal": None}, "finish_reason": "stop",
                                "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43,
                             "prompt_tokens_details": {"cached_tokens": 32}}
    assert gateway.calls[-1] == ("infer", "llava", PNG, "Hi", Sampling(max_tokens=7, temperature=0.5, top_p=0.8,
                                                                       seed=3))
    chat(client, model="moondream2", max_tokens=7, max_completion_tokens=9, top_p=0, temperature=1.0,
         extra={"task": "x"}, task="detect")
    assert gateway.calls[-1][4] == Sampling(max_tokens=9, temperature=0.0, top_p=None, task="detect")
    # A model without tasks: a 400 naming the field (Triton would refuse the unknown input as a server error).
    refused = chat(client, task="detect")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "task"


def test_streaming_events(client: TestClient, gateway: FakeGateway) -> None:
    response = chat(client, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    got = events(response.text)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [{"role": "assistant", "content": ""},
                                                               {"content": "The"}, {"content": " answer"},
                                                               {"content": "."}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 40, "completion_tokens": 3,
                                                                   "total_tokens": 43,
                                                                   "prompt_tokens_details": {"cached_tokens": 16}}
    assert all(c["usage"] is None for c in chunks[:-1]) and len({c["id"] for c in chunks}) == 1
    assert gateway.calls[-1][0] == "stream" and gateway.closed_streams == 1
    plain = events(chat(client, stream=True).text)
    assert all("usage" not in c for c in plain[:-1])
    # A model without a <model>_stream (as this fake kosmos2): the whole answer in one chunk, entities on the last
    whole = events(chat(client, model="kosmos2", stream=True).text)
    assert [c["choices"][0]["delta"] for c in whole[:-1]] == [{"role": "assistant", "content": ""},
                                                              {"content": "The answer."}, {"entities": ENTITIES}]
    assert gateway.calls[-1][0] == "infer"


def test_n_choices_stream_interleaved_each_with_its_index_and_finish_reason(client: TestClient,
                                                                          gateway: FakeGateway) -> None:
    """n > 1 streams from the engine model too: every chunk as it comes with its choice's index, each choice's own
    finish_reason on its last chunk, and the usage once all ended (the prompt once, every choice's tokens)."""
    got = events(chat(client, stream=True, n=3, stream_options={"include_usage": True}).text)
    assert gateway.calls[-1][0] == "stream" and gateway.calls[-1][4].n == 3
    assert got[-1] == "[DONE]"
    chunks, usage = got[:-2], got[-2]
    assert all(len(c["choices"]) == 1 for c in chunks)
    choices = [c["choices"][0] for c in chunks]
    assert choices[:3] == [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None} for i in range(3)]
    # In the order they came: choice 1's end before choice 0's second piece.
    assert [(c["index"], c["delta"].get("content"), c["finish_reason"]) for c in choices[3:]] == [
        (0, "A", None), (1, "B", None), (2, "C", None), (1, " b.", None), (1, None, "stop"), (0, " a", None),
        (2, " c", None), (0, ".", None), (0, None, "length"), (2, " c.", None), (2, None, "length")]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 40, "completion_tokens": 3 + 2 + 4, "total_tokens": 49,
        "prompt_tokens_details": {"cached_tokens": 16}}  # choice 0's: the others copied its prefill
    # A model without a <model>_stream: the whole answer, its further choices one chunk each.
    whole = [c["choices"][0] for c in events(chat(client, model="kosmos2", stream=True, n=3,
                                                  stream_options={"include_usage": True}).text)[:-2]]
    assert [(c["index"], c["delta"], c["finish_reason"]) for c in whole] == [
        (0, {"role": "assistant", "content": ""}, None), (1, {"role": "assistant", "content": ""}, None),
        (2, {"role": "assistant", "content": ""}, None), (0, {"content": "The answer."}, None),
        (0, {"entities": ENTITIES}, "stop"), (1, {"content": "Answer 1."}, "stop"), (2, {"content": "Answer 2."}, "stop")]
    answer = chat(client, model="kosmos2", n=3).json()
    assert [c["message"]["content"] for c in answer["choices"]] == ["The answer.", "Answer 1.", "Answer 2."]
    assert answer["usage"]["completion_tokens"] == 3 + 2 + 3


def test_entities_extension_only_from_models_that_have_it(client: TestClient, gateway: FakeGateway) -> None:
    """kosmos2 (an ``entities`` output in its metadata) answers message.entities; the others stay plain OpenAI,
    and Triton is never asked for an output the model lacks."""
    grounded = chat(client, model="kosmos2").json()["choices"][0]["message"]
    assert grounded["entities"] == ENTITIES and grounded["content"] == "The answer."
    plain = chat(client, model="moondream2").json()["choices"][0]["message"]
    assert "entities" not in plain
    streamed = events(chat(client, model="moondream2", stream=True).text)
    assert all("entities" not in c["choices"][0]["delta"] for c in streamed[:-1])
    assert gateway.asked_entities == [True, False, False]
    schema = client.get("/openapi.json", headers=AUTH).json()["components"]["schemas"]
    assert "entities" in schema["AssistantAnswer"]["properties"] and "entities" in schema["Delta"]["properties"]
    assert set(schema["GroundedEntity"]["properties"]) == {"phrase", "span", "boxes", "boxes_px"}


def test_model_cards_say_what_each_model_can_do(client: TestClient) -> None:
    cards = {m["id"]: m["capabilities"] for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert cards == {"llava": ["stream"], "kosmos2": ["entities"], "moondream2": ["task"]}
    assert client.get("/v1/models/moondream2", headers=AUTH).json()["capabilities"] == ["task"]


def test_gateway_reads_entities_and_capabilities_from_triton() -> None:
    """TritonGateway against a fake gRPC client: metadata decides the capabilities and the outputs asked for; a
    whole answer of a model with a ``<model>_stream`` companion comes from the companion (one Triton pass)."""
    import types

    import numpy as np

    from triton_vlm.openai.triton import TritonGateway

    class Tensor:
        def __init__(self, name: str) -> None:
            self.name = name

    class Metadata:
        def __init__(self, inputs: list[str], outputs: list[str]) -> None:
            self.inputs, self.outputs = [Tensor(n) for n in inputs], [Tensor(n) for n in outputs]

    class Result:
        def __init__(self, arrays: dict[str, Any]) -> None:
            self.arrays = arrays
            # What a stream response also has: its outputs and Triton's final flag.
            self.outputs = list(arrays)
            self.parameters = {"triton_final_response": types.SimpleNamespace(bool_param=True)}

        def as_numpy(self, name: str) -> Any:
            return self.arrays.get(name)

        def get_response(self) -> Result:
            return self

    class Index:
        def __init__(self, names: list[str]) -> None:
            self.models = [type("M", (), {"name": n, "state": "READY"})() for n in names]

    asked: list[list[str]] = []
    sent: list[dict[str, list[int]]] = []  # each call's input names and shapes
    streamed: list[tuple[str, bytes]] = []  # (model, the stream input's raw value)
    raw = json.dumps(ENTITIES).encode()

    class FakeGrpc:
        async def get_model_repository_index(self, client_timeout: float) -> Index:
            return Index(["kosmos2", "llava", "llava_stream", "moondream2"])

        async def get_model_metadata(self, name: str, client_timeout: float) -> Metadata:
            base = ["generated_text", "generated_tokens", "prompt_tokens", "finish_reason"]
            return {"kosmos2": Metadata(["image", "prompt"], [*base, "entities"]),
                    "moondream2": Metadata(["image", "prompt", "task"], base)}.get(
                name, Metadata(["image"], [*base, "cached_tokens"]))

        async def infer(self, model: str, inputs: Any, outputs: Any, client_timeout: float) -> Result:
            names = [o.name() for o in outputs]
            asked.append(names)
            sent.append({t.name(): t.shape() for t in inputs})
            arrays = {"generated_text": np.array([b"An image of a snowman"], dtype=object),
                      "generated_tokens": np.array([5]), "prompt_tokens": np.array([70]),
                      "finish_reason": np.array([b"stop"], dtype=object)}
            if "entities" in names:
                arrays["entities"] = np.array([raw], dtype=object)
            if "cached_tokens" in names:
                arrays["cached_tokens"] = np.array([48])
            if "choices" in names:
                arrays["choices"] = np.array([encode_choices([Choice(1, "A snowman.", "stop", 3)]).encode()],
                                             dtype=object)
            return Result(arrays)

        def stream_infer(self, requests: Any, stream_timeout: float) -> Any:
            async def responses() -> Any:
                request = await requests.__anext__()
                streamed.append((request["model_name"],
                                 {t.name(): t for t in request["inputs"]}["stream"]._get_content()))
                yield await self.infer(request["model_name"], request["inputs"], request["outputs"], 1), None
                async for _ in requests:  # until the gateway half-closes
                    pass
            return responses()

    async def scenario() -> None:
        gateway = TritonGateway("fake:8001")
        gateway._client = FakeGrpc()
        models = await gateway.models()
        assert models["kosmos2"].entities and not models["kosmos2"].tasks
        assert models["moondream2"].tasks and not models["moondream2"].entities
        assert models["llava"].streams and "llava_stream" not in models
        grounding = ChatInput('[{"role": "user", "content": "<grounding>An image of"}]', (PNG,))
        piece = await gateway.infer("kosmos2", grounding, Sampling(), entities=True)
        assert piece.entities == ENTITIES and piece.text == "An image of a snowman"
        two = ChatInput('[{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]', (PNG, PNG))
        answer = await gateway.infer("llava", two, Sampling(n=2))
        assert answer.entities is None and answer.cached_tokens == 48 and piece.cached_tokens == 0
        assert answer.choices == (Choice(1, "A snowman.", "stop", 3),)
        assert "entities" in asked[0] and "entities" not in asked[1]
        # cached_tokens only where the model declares it; the choices and their index where n > 1.
        assert "cached_tokens" not in asked[0] and {"cached_tokens", "choices", "index"} <= set(asked[1])
        # The chat form: messages and one images element per image; never the prompt form's inputs.
        assert sent[0] == {"messages": [1, 1], "images": [1, 1]} and sent[1] == {"messages": [1, 1], "images": [1, 2],
                                                                                 "stream": [1, 1], "n": [1, 1]}
        assert streamed == [("llava_stream", b"\x00")]  # llava: from llava_stream, the whole answer (stream=False)

    asyncio.run(scenario())


@pytest.mark.parametrize("error, status, code", [
    (InvalidInputError("image: not a recognised image (PIL: cannot identify)", param="image"), 400, "invalid_value"),
    (InvalidInputError("max_tokens must be in [1, 1024], got 5000", param="max_tokens"), 400, "invalid_value"),
    (UnknownModelError("gone"), 404, "model_not_found"),
    (ModelUnavailableError("weights missing"), 503, "model_unavailable"),
    (ServerUnreachableError("refused"), 503, "triton_unreachable"),
    (RequestTimeoutError("slow"), 504, "timeout"),
    (GenerationError("CUDA error"), 500, "generation_error"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_triton_errors_before_the_first_token_get_their_status(client: TestClient, gateway: FakeGateway,
                                                              error: Exception, status: int, code: str,
                                                              stream: bool) -> None:
    gateway.fail = error
    response = chat(client, stream=stream, max_tokens=5000)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code and set(response.json()["error"]) == {"message", "type",
                                                                                           "param", "code"}
    if status in (503,):
        assert response.headers["retry-after"] == "1"
    # The field at fault is the error's param (never read from the message), named as the request named it.
    expected_param = {"max_tokens": "max_tokens", "image": "messages"}.get(getattr(error, "param", None) or "")
    assert response.json()["error"]["param"] == (expected_param or (None if status != 404 else "model"))
    assert from_triton(error, "llava").status == status  # type: ignore[arg-type]


@pytest.mark.parametrize("param, limit_field, expected", [
    ("image", "max_tokens", "messages"), ("prompt", "max_tokens", "messages"),
    ("max_tokens", "max_completion_tokens", "max_completion_tokens"), ("max_tokens", "max_tokens", "max_tokens"),
    ("temperature", "max_tokens", "temperature"), ("top_p", "max_tokens", "top_p"), ("seed", "max_tokens", "seed"),
    ("task", "max_tokens", "task"), (None, "max_tokens", None),
])
def test_the_field_at_fault_comes_from_the_error_s_param(param: str | None, limit_field: str,
                                                         expected: str | None) -> None:
    """Only ``param`` counts: a message that starts with a field name names nothing by itself."""
    error = InvalidInputError("max_tokens and temperature are both in this message", param=param)
    assert from_triton(error, "llava", max_tokens_param=limit_field).param == expected


def test_an_error_mid_stream_is_an_error_event(client: TestClient, gateway: FakeGateway) -> None:
    gateway.fail_after_pieces = GenerationError("the engine died")
    got = events(chat(client, stream=True).text)
    assert got[-1] == {"error": {"message": "the engine died", "type": "server_error", "param": None,
                                 "code": "generation_error"}}
    assert "[DONE]" not in got and gateway.closed_streams == 1


def test_unsupported_parameters_are_400(client: TestClient) -> None:
    for field, value in (("n", 9), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("top_logprobs", 21),
                         ("top_logprobs", 2), ("repetition_penalty", 0), ("logit_bias", {"1": 2}),
                         ("tools", [{"type": "function"}]),
                         ("temperature", 2.5), ("top_p", 1.5), ("seed", -1), ("max_tokens", 0),
                         ("max_completion_tokens", 2**31)):
        response = chat(client, **{field: value})
        assert response.status_code == 400, (field, value)
        assert response.json()["error"]["param"] == field, (field, value, response.json())
    for field, value in (("n", 1), ("n", 3), ("stop", []), ("stop", "\n"), ("stop", ["x"]), ("presence_penalty", 0.5),
                         ("frequency_penalty", -1), ("logprobs", True), ("logprobs", False),
                         ("response_format", {"type": "text"}), ("stream", None)):
        assert chat(client, **{field: value}).status_code == 200, (field, value)


def test_response_format_goes_to_the_model_as_json(client: TestClient, gateway: FakeGateway) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}, "strict": True}}
    assert chat(client, response_format=fmt).status_code == 200
    sent = gateway.calls[-1][4].response_format
    assert sent is not None and json.loads(sent) == fmt
    assert chat(client, response_format={"type": "text"}).status_code == 200
    assert gateway.calls[-1][4].response_format is None  # plain text: nothing sent


def test_unknown_model_urls_and_methods(client: TestClient) -> None:
    response = chat(client, model="gpt-4o")
    assert response.status_code == 404
    assert response.json()["error"] == {"message": "The model 'gpt-4o' does not exist; this server has: llava, "
                                                   "kosmos2, moondream2", "type": "invalid_request_error", "param": "model",
                                        "code": "model_not_found"}
    assert client.get("/v1/models/gpt-4o", headers=AUTH).status_code == 404
    assert client.get("/v1/models/kosmos2", headers=AUTH).json()["id"] == "kosmos2"
    assert client.get("/v1/nothing", headers=AUTH).json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/chat/completions", headers=AUTH).status_code == 405
    response = client.post("/v1/chat/completions", content=b"{not json", headers={**AUTH,
                                                                                 "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_body_limit_with_and_without_content_length(gateway: FakeGateway) -> None:
    with make_client(gateway, max_body_bytes=2000) as client:
        assert chat(client).status_code == 200
        response = chat(client, messages=[user("x" * 3000, DATA_URI)])
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

        def chunked() -> Iterator[bytes]:
            yield b'{"model": "llava", "messages": ['
            for _ in range(40):
                yield b'{"role": "system", "content": "' + b"y" * 100 + b'"},'
            yield b"]}"

        response = client.post("/v1/chat/completions", content=chunked(), headers={**AUTH,
                                                                                 "Content-Type": "application/json"})
        assert response.status_code == 413


def _held(gateway: FakeGateway, send: Callable[[], Any]) -> threading.Thread:
    """Start ``send`` in a thread and return once its request is in flight (held by the gateway)."""
    if gateway.hold is None:
        gateway.hold = threading.Event()
    calls = len(gateway.calls)
    thread = threading.Thread(target=send)
    thread.start()
    deadline = time.monotonic() + 10
    while len(gateway.calls) == calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(gateway.calls) == calls + 1, "the request never reached the gateway"
    return thread


def test_too_many_requests_in_flight_is_429(gateway: FakeGateway) -> None:
    with make_client(gateway, max_concurrent_requests=1) as client:
        first = _held(gateway, lambda: chat(client))
        response = chat(client)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_exceeded"
        gateway.hold.set()
        first.join(timeout=10)
        assert chat(client).status_code == 200  # the slot came back
        assert chat(client, stream=True).status_code == 200
        assert chat(client, stream=True).status_code == 200  # streams give theirs back when they end


def test_each_api_key_has_its_own_bound(gateway: FakeGateway) -> None:
    other = "sk-other-" + "f" * 16
    with TestClient(create_app(OpenAIOptions(api_keys=(KEY, other), max_concurrent_per_key=1), gateway)) as client:
        first = _held(gateway, lambda: chat(client))
        refused = chat(client)
        assert refused.status_code == 429 and "for this API key (limit 1)" in refused.json()["error"]["message"]
        second = _held(gateway, lambda: client.post(  # another key still gets its slot
            "/v1/chat/completions", json={"model": "llava", "messages": [user("Hi", DATA_URI)]},
            headers={"Authorization": f"Bearer {other}"}))
        assert gateway.hold is not None
        gateway.hold.set()
        first.join(timeout=10)
        second.join(timeout=10)
        assert chat(client).status_code == 200  # the key's slot came back
        assert chat(client, stream=True).status_code == 200


def test_cors_is_off_unless_configured(gateway: FakeGateway) -> None:
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    with make_client(gateway) as client:
        response = client.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    with make_client(gateway, cors_origins=("https://ui.example",)) as client:
        response = client.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "https://ui.example"
        response = client.get("/v1/models", headers={**AUTH, "Origin": "https://ui.example"})
        assert response.headers["access-control-allow-origin"] == "https://ui.example"


# -- any text, any numbers: never a 5xx -----------------------------------------------------------------------
texts = st.text(st.characters(codec=None), max_size=40)  # lone surrogates included


_PROPERTY_GATEWAY = FakeGateway()
_property_client: TestClient | None = None


def _client_for_properties() -> TestClient:
    global _property_client
    if _property_client is None:
        _property_client = TestClient(create_app(OpenAIOptions(), _PROPERTY_GATEWAY))
    return _property_client


@settings(max_examples=100)
@given(question=texts, system=st.none() | texts, temperature=st.none() | st.floats(-1, 3),
       top_p=st.none() | st.floats(-1, 2), seed=st.none() | st.integers(-2**64, 2**64),
       max_tokens=st.none() | st.integers(-5, 2**40), stream=st.booleans(), image=st.sampled_from(
           [DATA_URI, "data:image/png;base64,@@", "data:,", "data:image/png;base64," + "QQ==" * 5, "http://x/y.png",
            "data:image/png,%ZZ%ff", "data:image/png,\udc80"]))
def test_well_formed_requests_never_fail_with_5xx(question: str, system: str | None, temperature: float | None,
                                                  top_p: float | None, seed: int | None, max_tokens: int | None,
                                                  stream: bool, image: str) -> None:
    gateway, client = _PROPERTY_GATEWAY, _client_for_properties()
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [user(question, image)]
    body = {"model": "llava", "messages": messages, "stream": stream}
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed),
                        ("max_tokens", max_tokens)):
        if value is not None:
            body[name] = value
    response = client.post("/v1/chat/completions", content=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    else:
        sent = json.loads(gateway.inputs[-1].messages)  # the conversation as it came, the image in its place
        assert sent[-1] == {"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}
        assert sent[:-1] == ([{"role": "system", "content": system}] if system is not None else [])


def test_a_client_that_leaves_cancels_its_whole_answer_request(gateway: FakeGateway,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams end when their generator is closed; a whole-answer request watches its client instead, and
    cancels the call to Triton (which then cancels the request and the backend stops generating)."""
    from triton_vlm.openai import app as app_module

    monkeypatch.setattr(app_module, "DISCONNECT_POLL_S", 0.01)
    gateway.hold = threading.Event()  # the answer never comes on its own
    app = create_app(OpenAIOptions(api_keys=(KEY,)), gateway)
    body = json.dumps({"model": "llava", "messages": [user("Hi", DATA_URI)]}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 9000),
             "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {KEY}".encode()),
                         (b"content-length", str(len(body)).encode())]}
    sent: list[dict[str, Any]] = []

    async def talk() -> None:
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop(0)
            if gateway.calls:  # the request reached Triton: now the client leaves
                return {"type": "http.disconnect"}
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await asyncio.wait_for(app(scope, receive, send), timeout=10)

    asyncio.run(talk())
    assert len(gateway.calls) == 1 and gateway.cancelled == 1
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    gateway.hold.set()
    with make_client(gateway) as client:  # and the front goes on serving
        assert chat(client).status_code == 200


def test_a_streaming_model_with_entities_sends_them_on_the_last_chunk(client: TestClient,
                                                                      gateway: FakeGateway) -> None:
    """kosmos2 on an engine host streams from kosmos2_stream: its last piece carries the entities."""
    served = {"kosmos2": ServedModel("kosmos2", True, entities=True)}

    async def models(refresh: bool = False) -> dict[str, ServedModel]:
        return served

    gateway.models = models  # type: ignore[method-assign]
    chunks = events(chat(client, model="kosmos2", stream=True).text)
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[-1] == {"entities": ENTITIES} and all("entities" not in d for d in deltas[:-1])
    assert gateway.calls[-1][0] == "stream" and gateway.asked_entities == [True]
