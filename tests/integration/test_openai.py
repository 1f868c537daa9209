"""The OpenAI-compatible front against the real tritonserver (tiny weights), with the official ``openai`` client.

The session's front process (``front`` in conftest.py) points at the session's tritonserver over gRPC, with an API
key and small body/image limits so the 413 paths are cheap to reach.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import openai
import pytest
from PIL import Image
from tests.conftest import ROOT, SAMPLE_IMAGE, free_ports
from tests.integration.conftest import API_KEY, ENGINE_MODELS, PROMPTS, WORKING_MODELS, Front, RunningServer

from triton_client import TritonVLMClient
from triton_vlm.errors import InvalidInputError

pytestmark = pytest.mark.integration

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def png() -> bytes:
    buffer = io.BytesIO()
    Image.open(SAMPLE_IMAGE).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(image).decode()}"


def user(text: str, image: bytes | None) -> dict:
    parts: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
    return {"role": "user", "content": parts}


def _raw(url: str, *, method: str = "GET", body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# -- models -------------------------------------------------------------------------------------------------
def test_list_and_retrieve_models(front: Front) -> None:
    client = front.client()
    models = client.models.list()
    assert sorted(m.id for m in models.data) == sorted(WORKING_MODELS)  # llava_stream is not a model of its own
    assert all(m.object == "model" and m.owned_by == "triton-vlm" for m in models.data)
    assert client.models.retrieve("llava").id == "llava"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


# -- answers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", WORKING_MODELS)
def test_chat_equals_the_kserve_client_streamed_or_not(front: Front, triton: RunningServer, png: bytes,
                                                      model: str) -> None:
    """Greedy: the non-streamed content, the streamed chunks joined, and TritonVLMClient.infer agree; usage comes
    from Triton's token counts."""
    with TritonVLMClient(triton.http_url) as kserve:
        expected = kserve.infer_result(model, png, PROMPTS[model], max_tokens=MAX_TOKENS)
    client = front.client()
    # The prompt form is one user turn [image, prompt]: the same turn as messages gets the same rendering.
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png)}},
                                             {"type": "text", "text": PROMPTS[model]}]}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS)
    assert answer.object == "chat.completion" and answer.model == model and answer.id.startswith("chatcmpl-")
    (choice,) = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (expected.prompt_tokens,
                                                                            expected.generated_tokens)
    assert answer.usage.total_tokens == expected.prompt_tokens + expected.generated_tokens

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_completion_tokens=MAX_TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    pieces = [c.choices[0].delta.content for c in with_choices if c.choices[0].delta.content]
    assert "".join(pieces) == expected.text
    assert [c.choices[0].finish_reason for c in with_choices][-1] == expected.finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    # The same counts (the streamed request may find the first one's prompt in the engine's prefix cache).
    assert usage_chunk.usage.model_dump(exclude={"prompt_tokens_details"}) == answer.usage.model_dump(
        exclude={"prompt_tokens_details"})
    assert all(c.usage is None for c in chunks[:-1])
    if f"{model}_stream" in ENGINE_MODELS and model != "kosmos2":  # the engine's token stream, several pieces
        assert len(pieces) >= 2
    else:  # kosmos2: its tiny model answers one piece or nothing
        assert len(pieces) == (1 if expected.text else 0)


def test_leaving_a_stream_early_and_asking_again(front: Front, png: bytes) -> None:
    client = front.client()
    stream = client.chat.completions.create(model="llava", messages=[user("Describe it.", png)], max_tokens=400,
                                            temperature=1.0, seed=1, stream=True)
    next(iter(stream))
    stream.close()  # closes the connection: the front closes the gRPC stream, which cancels it in Triton
    again = client.chat.completions.create(model="llava", messages=[user("Describe it.", png)], max_tokens=3)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_sampling_parameters_reach_the_model(front: Front, triton: RunningServer, png: bytes) -> None:
    client = front.client()
    sampled = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=MAX_TOKENS)
    messages = [user("Describe it.", png)]
    runs = [client.chat.completions.create(model="llava", messages=messages, **sampled).choices[0].message.content
            for _ in range(2)]
    with TritonVLMClient(triton.http_url) as kserve:
        expected = kserve.infer("llava", png, "Describe it.", max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9,
                                seed=1234)
    assert runs == [expected, expected]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="llava", messages=messages, stream=True, **sampled) if c.choices)
    assert streamed == expected
    # OpenAI's top_p=0 keeps only the most likely token: greedy, whatever the temperature.
    greedy = client.chat.completions.create(model="llava", messages=messages, max_tokens=MAX_TOKENS, top_p=0,
                                            temperature=1.5, seed=5)
    with TritonVLMClient(triton.http_url) as kserve:
        assert greedy.choices[0].message.content == kserve.infer("llava", png, "Describe it.", max_tokens=MAX_TOKENS)


# -- sampling and output options (issue 24): stop, n, logprobs, penalties; the engine route and the batched one -------
def test_stop_cuts_a_greedy_answer_exactly_before_it_streamed_or_not(front: Front, triton: RunningServer,
                                                                      png: bytes) -> None:
    client = front.client()
    messages = [user("Describe it.", png)]
    full = client.chat.completions.create(model="llava", messages=messages, max_tokens=16).choices[0].message.content
    assert full and len(full) > 8
    stop = full[len(full) // 2:len(full) // 2 + 3]  # from the middle of the answer: it may span tokens
    expected = full[:full.find(stop)]
    answer = client.chat.completions.create(model="llava", messages=messages, max_tokens=16, stop=[stop, "\x01"])
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
    chunks = [c for c in client.chat.completions.create(model="llava", messages=messages, max_tokens=16, stop=stop,
                                                        stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    with TritonVLMClient(triton.http_url) as kserve:  # the batched public model
        batched = kserve.infer_result("llava", png, "Describe it.", max_tokens=16, stop=stop)
    assert (batched.text, batched.finish_reason) == (expected, "stop")


def test_n_choices_with_a_seed(front: Front, triton: RunningServer, png: bytes) -> None:
    """n=3 through the front runs on llava_stream's engine (one sequence per choice), streamed or not, and answers
    what the public model's batched loop answers for the same seeded request."""
    with TritonVLMClient(triton.http_url) as kserve:  # on this CPU host the public llava is the batched loop
        batched = kserve.infer_result("llava", png, "Describe it.", max_tokens=8, temperature=1.0, seed=7, n=3)
    texts = [batched.text, *(c.text for c in batched.choices)]
    reasons = [batched.finish_reason, *(c.finish_reason for c in batched.choices)]
    completion_tokens = batched.generated_tokens + sum(c.generated_tokens for c in batched.choices)
    assert len(set(texts)) == 3 and batched.cached_tokens == 0  # the batched loop keeps no prefix cache
    client = front.client()
    sampled = dict(model="llava", messages=[user("Describe it.", png)], max_tokens=8, temperature=1.0, seed=7, n=3)
    answer = client.chat.completions.create(**sampled)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert [c.message.content for c in answer.choices] == texts
    assert [c.finish_reason for c in answer.choices] == reasons
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (batched.prompt_tokens, completion_tokens)
    assert [c.message.content for c in client.chat.completions.create(**sampled).choices] == texts

    chunks = list(client.chat.completions.create(**sampled, stream=True, stream_options={"include_usage": True}))
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finishes: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for chunk in chunks:
        for c in chunk.choices:
            if c.delta.content:
                pieces[c.index].append(c.delta.content)
            if c.finish_reason:
                finishes[c.index].append(c.finish_reason)
    assert ["".join(pieces[i]) for i in range(3)] == texts
    assert [finishes[i] for i in range(3)] == [[reason] for reason in reasons]  # each choice's own, once
    assert max(len(p) for p in pieces.values()) >= 2  # token by token from the engine, not each choice whole
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (batched.prompt_tokens, completion_tokens)

    # The KServe client's stream of the same request: the same choices, interleaved, each with its index.
    with TritonVLMClient(triton.http_url, grpc_url=triton.grpc_url) as kserve:
        streamed = list(kserve.stream_pieces("llava", png, "Describe it.", max_tokens=8, temperature=1.0, seed=7, n=3))
    assert ["".join(p.text for p in streamed if p.index == i) for i in range(3)] == texts
    assert sorted(p.index for p in streamed if p.finish_reason) == [0, 1, 2]


def test_a_repeated_chat_takes_its_prompt_from_the_prefix_cache(front: Front, triton: RunningServer,
                                                               png: bytes) -> None:
    """The engine keeps a finished prompt's blocks: the same conversation again prefills only what lies past them,
    and says so in usage.prompt_tokens_details.cached_tokens (and the cached_tokens output)."""
    client = front.client()
    messages = [user("What colours are in this picture, and where?", png)]
    first = client.chat.completions.create(model="llava", messages=messages, max_tokens=4)
    again = client.chat.completions.create(model="llava", messages=messages, max_tokens=4)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 0 < cached < again.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model="llava", messages=messages, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == cached
    turns = [{"role": "user", "content": [{"type": "text", "text": "What colours are in this picture, and where?"},
                                          {"type": "image"}]}]
    with TritonVLMClient(triton.http_url, grpc_url=triton.grpc_url) as kserve:
        engine = kserve.chat_result("llava_stream", turns, images=[png], max_tokens=4)  # over its gRPC stream
        batched = kserve.chat_result("llava", turns, images=[png], max_tokens=4)
    assert engine.text == batched.text == first.choices[0].message.content
    assert engine.cached_tokens == cached and batched.cached_tokens == 0


def test_logprobs_one_entry_per_generated_token(front: Front, triton: RunningServer, png: bytes) -> None:
    from triton_vlm.direct import direct_runtime

    tokenizer = direct_runtime("llava", tiny=True, device="cpu").ensure_loaded().processor.tokenizer
    client = front.client()
    messages = [user("Describe it.", png)]
    answer = client.chat.completions.create(model="llava", messages=messages, max_tokens=8, logprobs=True,
                                            top_logprobs=2)
    choice = answer.choices[0]
    entries = choice.logprobs.content if choice.logprobs else None
    assert entries and answer.usage and len(entries) == answer.usage.completion_tokens
    ids = [e.model_extra["token_id"] for e in entries]  # type: ignore[index]
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == choice.message.content
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-4 for e in entries)
    streamed = [e for c in client.chat.completions.create(model="llava", messages=messages, max_tokens=8,
                                                          logprobs=True, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert [e.model_extra["token_id"] for e in streamed] == ids  # type: ignore[index]
    with TritonVLMClient(triton.http_url) as kserve:
        batched = kserve.infer_result("llava", png, "Describe it.", max_tokens=8, logprobs=True, top_logprobs=2)
    assert [e.token_id for e in batched.logprobs] == ids
    assert [e.logprob for e in batched.logprobs] == pytest.approx([e.logprob for e in entries], abs=1e-3)


def test_penalties_change_greedy_output(front: Front, triton: RunningServer, png: bytes) -> None:
    client = front.client()
    messages = [user("Describe it.", png)]
    plain = client.chat.completions.create(model="llava", messages=messages, max_tokens=12)
    # Random weights rarely repeat a token: penalties that reward repeats show (negative, as OpenAI allows).
    rewarded = client.chat.completions.create(model="llava", messages=messages, max_tokens=12,
                                              frequency_penalty=-2, presence_penalty=-1)
    assert rewarded.choices[0].message.content != plain.choices[0].message.content
    with TritonVLMClient(triton.http_url) as kserve:
        batched = kserve.infer_result("llava", png, "Describe it.", max_tokens=12, frequency_penalty=-2.0,
                                      presence_penalty=-1.0)
        repeated = kserve.infer_result("llava", png, "Describe it.", max_tokens=12, repetition_penalty=0.05)
    assert batched.text == rewarded.choices[0].message.content
    assert repeated.text != plain.choices[0].message.content
    extension = client.chat.completions.create(model="llava", messages=messages, max_tokens=12,
                                               extra_body={"repetition_penalty": 0.05})
    assert extension.choices[0].message.content == repeated.text


# -- chats (issue 24): the conversation as messages + images, rendered by the model's own template ------------------
def _hf(messages: list[dict]) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages as the Triton contract's ``messages`` (``{"type": "image"}`` parts) and their images."""
    images: list[bytes] = []
    turns = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    images.append(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            content = parts
        turns.append({**message, "content": content})
    return turns, images


def _both_ways(front: Front, model: str, messages: list[dict]) -> tuple[str, str]:
    """The front's answer (from ``<model>_stream``, the engine, where there is one) and its stream joined."""
    client = front.client()
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, stream=True) if c.choices)
    return answer.choices[0].message.content or "", streamed


@pytest.mark.parametrize("model", ["llava", "moondream2", "qwen2_vl", "llava_next", "smolvlm"])
def test_a_multi_turn_chat_is_the_models_own_conversation(front: Front, triton: RunningServer, png: bytes,
                                                          model: str) -> None:
    """System, earlier turns and the question reach the model as a conversation: the front (the engine route,
    <model>_stream) answers what TritonVLMClient.chat gets from the public model (the batched loop), and not what
    the old one-prompt transcript gets."""
    messages = [{"role": "system", "content": "Answer briefly."}, user("What is this?", png),
                {"role": "assistant", "content": "A house."}, {"role": "user", "content": "What colour is it?"}]
    turns, images = _hf(messages)
    with TritonVLMClient(triton.http_url) as kserve:
        expected = kserve.chat_result(model, turns, images, max_tokens=MAX_TOKENS)
        folded = kserve.infer_result(model, png, "Answer briefly.\n\nUser: What is this?\nAssistant: A house.\n"
                                                 "User: What colour is it?", max_tokens=MAX_TOKENS)
    assert _both_ways(front, model, messages) == (expected.text, expected.text)
    assert expected.prompt_tokens != folded.prompt_tokens  # a template, not the transcript


def test_a_text_only_chat(front: Front, triton: RunningServer, png: bytes) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something nice."}]
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as kserve:
        expected = kserve.chat_result("llava", messages, max_tokens=MAX_TOKENS)
        with_image = kserve.chat_result("llava", [messages[0], {"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Say something nice."}]}], [png], max_tokens=MAX_TOKENS)
    assert expected.generated_tokens > 0
    assert with_image.prompt_tokens >= expected.prompt_tokens + 25  # the tiny CLIP's 25 image rows, not there
    assert _both_ways(front, "llava", messages) == (expected.text, expected.text)


def test_two_images_in_one_message_on_llava(front: Front, triton: RunningServer, png: bytes) -> None:
    other = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(other, format="PNG")
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": data_uri(png)}},
        {"type": "text", "text": "with"}, {"type": "image_url", "image_url": {"url": data_uri(other.getvalue())}}]}]
    turns, images = _hf(messages)
    with TritonVLMClient(triton.http_url) as kserve:
        expected = kserve.chat_result("llava", turns, images, max_tokens=MAX_TOKENS)
        one = kserve.chat_result("llava", turns[:1], images[:1] + images[:1], max_tokens=MAX_TOKENS)
    assert _both_ways(front, "llava", messages) == (expected.text, expected.text)
    assert expected.prompt_tokens == one.prompt_tokens  # both images' rows in the prompt, whichever they are
    answer = front.client().chat.completions.create(model="llava", messages=messages, max_tokens=MAX_TOKENS)
    assert answer.usage is not None and answer.usage.prompt_tokens == expected.prompt_tokens


@pytest.mark.parametrize("model", ["qwen2_vl", "llava_next", "smolvlm"])
def test_text_only_and_two_images_on_the_other_engine_families(front: Front, triton: RunningServer, png: bytes,
                                                               model: str) -> None:
    """A text-only chat and two images in one message: the front (the engine, <model>_stream) answers what the
    public model's batched loop answers, streamed or not, with both images' rows in the prompt."""
    other = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(other, format="PNG")
    text_only = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something nice."}]
    two = [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": data_uri(png)}},
        {"type": "text", "text": "with"}, {"type": "image_url", "image_url": {"url": data_uri(other.getvalue())}}]}]
    answers = []
    with TritonVLMClient(triton.http_url) as kserve:
        for messages in (text_only, two):
            turns, images = _hf(messages)
            expected = kserve.chat_result(model, turns, images, max_tokens=MAX_TOKENS)
            assert expected.generated_tokens > 0
            assert _both_ways(front, model, messages) == (expected.text, expected.text)
            answers.append(expected)
        first_only = [{"role": "user", "content": two[0]["content"][:3]}]
        one = kserve.chat_result(model, *_hf(first_only), max_tokens=MAX_TOKENS)
    assert answers[1].prompt_tokens > one.prompt_tokens > answers[0].prompt_tokens  # the second image's rows too


@pytest.mark.parametrize("stream", [False, True])
def test_two_images_on_moondream2_is_a_400_naming_its_limit(front: Front, triton: RunningServer, png: bytes,
                                                             stream: bool) -> None:
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Compare."}, {"type": "image_url", "image_url": {"url": data_uri(png)}},
        {"type": "image_url", "image_url": {"url": data_uri(png)}}]}]
    client = front.client()
    with pytest.raises(openai.BadRequestError) as error:
        if stream:
            list(client.chat.completions.create(model="moondream2", messages=messages, max_tokens=4, stream=True))
        else:
            client.chat.completions.create(model="moondream2", messages=messages, max_tokens=4)
    body = _status_error(error)
    assert body["param"] == "messages" and "takes at most 1 per request" in body["message"]
    turns, images = _hf(messages)
    with TritonVLMClient(triton.http_url) as kserve, pytest.raises(InvalidInputError) as refused:
        kserve.chat("moondream2", turns, images)  # the public model (the batched loop) says the same
    assert refused.value.param == "images" and "takes at most 1 per request" in str(refused.value)


def test_moondream2_task_extension(front: Front, triton: RunningServer, png: bytes) -> None:
    client = front.client()
    answer = client.chat.completions.create(model="moondream2", messages=[user("house", png)], max_tokens=MAX_TOKENS,
                                            extra_body={"task": "detect"})
    with TritonVLMClient(triton.http_url) as kserve:
        assert answer.choices[0].message.content == kserve.infer("moondream2", png, "house", task="detect",
                                                                 max_tokens=MAX_TOKENS)


def test_kosmos2_entities_extension(front: Front, triton: RunningServer, png: bytes) -> None:
    """message.entities (and the last stream chunk's delta.entities) equal the KServe client's entities; models
    without the output answer plain OpenAI messages. (Tiny random weights tag nothing: an empty list, still
    present; the shapes with real boxes are in tests/unit/test_openai_front.py.)"""
    from dataclasses import asdict

    client = front.client()
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as kserve:
        expected = kserve.infer_result("kosmos2", png, PROMPTS["kosmos2"], max_tokens=MAX_TOKENS).entities
    as_json = [{**asdict(e), "span": list(e.span) if e.span else e.span} for e in expected]
    answer = client.chat.completions.create(model="kosmos2", messages=[user(PROMPTS["kosmos2"], png)],
                                            max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.model_extra["entities"] == as_json
    chunks = list(client.chat.completions.create(model="kosmos2", messages=[user(PROMPTS["kosmos2"], png)],
                                                 max_tokens=MAX_TOKENS, stream=True))
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason and last.choices[0].delta.model_extra["entities"] == as_json
    plain = client.chat.completions.create(model="llava", messages=[user("Hi", png)], max_tokens=2)
    assert "entities" not in (plain.choices[0].message.model_extra or {})
    cards = {m.id: m.model_extra["capabilities"] for m in client.models.list().data}
    assert cards["kosmos2"] == ["stream", "entities"] and cards["moondream2"] == ["stream", "task"]
    assert cards["llava"] == ["stream"]


# -- errors ---------------------------------------------------------------------------------------------------
def _status_error(error: pytest.ExceptionInfo[openai.APIStatusError]) -> dict:
    body = error.value.body
    assert isinstance(body, dict), body
    assert set(body) == {"message", "type", "param", "code"}
    return body


@pytest.mark.parametrize("stream", [False, True])
def test_request_errors_have_openai_status_codes(front: Front, png: bytes, stream: bool) -> None:
    client = front.client()

    def ask(**kwargs: object) -> object:
        request = {"model": "llava", "messages": [user("What is this?", png)], "max_tokens": 4, "stream": stream,
                   **kwargs}
        result = client.chat.completions.create(**request)  # type: ignore[call-overload]
        return list(result) if stream else result

    with pytest.raises(openai.BadRequestError) as error:
        ask(messages=[user("What is this?", b"definitely not an image")])
    assert "image" in _status_error(error)["message"] and error.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as error:
        ask(model="gpt-4o")
    assert _status_error(error) == {**_status_error(error), "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.BadRequestError) as error:
        ask(max_tokens=100000)
    body = _status_error(error)
    assert body["param"] == "max_tokens" and "max_tokens must be in [1, 1024]" in body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        ask(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "https://example.com/cat.png"}}]}])
    assert _status_error(error)["code"] == "remote_images_disabled"
    with pytest.raises(openai.BadRequestError) as error:
        ask(n=9)
    assert _status_error(error)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as error:  # the model's limit: INVALID_ARG naming the field
        ask(stop=["a", "b", "c", "d", "e"])
    assert _status_error(error)["param"] == "stop" and "at most 4" in _status_error(error)["message"]
    with pytest.raises(openai.BadRequestError):
        ask(messages=[{"role": "assistant", "content": "Hello"}])
    assert ask()  # and the server keeps serving


def test_stream_max_tokens_over_the_engine_context_is_a_400(front: Front, png: bytes) -> None:
    """llava_stream (the tiny engine's short context) refuses before the first token: still a status code."""
    with pytest.raises(openai.BadRequestError, match="context"):
        list(front.client().chat.completions.create(model="llava", messages=[user("Hi", png)], max_tokens=1024,
                                                    stream=True))


def test_too_large_bodies_and_images_are_413(front: Front, png: bytes) -> None:
    client = front.client()
    big = png + b"\0" * (front.options.max_image_bytes + 10 - len(png))  # under the body limit, over the image one
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(model="llava", messages=[user("Hi", big)], max_tokens=2)
    assert error.value.status_code == 413 and _status_error(error)["code"] == "image_too_large"
    huge = b"\0" * (front.options.max_body_bytes + 1)
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(model="llava", messages=[user("Hi", huge)], max_tokens=2)
    assert error.value.status_code == 413 and _status_error(error)["code"] == "request_too_large"


def test_api_key_is_required_except_for_health(front: Front, png: bytes) -> None:
    with pytest.raises(openai.AuthenticationError) as error:
        front.client(api_key="sk-wrong").models.list()
    assert _status_error(error)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        front.client(api_key="sk-wrong").chat.completions.create(model="llava", messages=[user("Hi", png)])
    for path in ("/v1/models", "/v1/models/llava", "/openapi.json"):
        status, headers, body = _raw(front.root + path)
        assert status == 401 and headers["www-authenticate"] == "Bearer", path
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    status, _, _ = _raw(front.root + "/v1/models", headers={"Authorization": "Basic " + API_KEY})
    assert status == 401
    assert _raw(front.root + "/health")[0] == 200
    status, _, body = _raw(front.root + "/health/ready")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert API_KEY not in front.log()


def test_cors_only_for_configured_origins(front: Front) -> None:
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = _raw(front.root + "/v1/chat/completions", method="OPTIONS", headers=preflight)
    assert status == 200 and headers["access-control-allow-origin"] == "https://ui.example"
    status, headers, _ = _raw(front.root + "/v1/chat/completions", method="OPTIONS",
                              headers={**preflight, "Origin": "https://evil.example"})
    assert status == 400 and "access-control-allow-origin" not in {k.lower() for k in headers}


def test_openapi_describes_the_api(front: Front) -> None:
    status, _, body = _raw(front.root + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
    schema = json.loads(body)
    assert status == 200 and schema["openapi"].startswith("3.")
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert {"application/json", "text/event-stream"} == set(chat["responses"]["200"]["content"])
    assert {"400", "401", "404", "413", "429", "500", "503"} <= set(chat["responses"])
    assert "422" not in chat["responses"]  # validation errors are 400s, as OpenAI answers them
    components = set(schema["components"]["schemas"])
    assert {"ChatCompletion", "ChatCompletionChunk", "ErrorResponse", "ModelList"} <= components
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# -- the README's and docs/openai.md's examples, as written ------------------------------------------------------
def test_readme_openai_commands_run(front: Front) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## OpenAI-compatible API", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [line for line in block.splitlines() if line.startswith("curl ")]
    assert len(commands) == 2 and "--openai-port 9000 --api-key sk-my-key" in block
    answers = []
    for command in commands:
        command = command.replace("127.0.0.1:9000", f"127.0.0.1:{front.options.port}").replace("sk-my-key", API_KEY)
        result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        answers.append(json.loads(result.stdout))
    assert answers[0]["object"] == "list" and "llava" in {m["id"] for m in answers[0]["data"]}
    assert answers[1]["object"] == "chat.completion" and answers[1]["usage"]["completion_tokens"] <= 16


def test_docs_python_example_runs(front: Front) -> None:
    (snippet,) = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "openai.md").read_text(), flags=re.S)
    code = snippet.replace("http://127.0.0.1:9000/v1", front.base_url).replace("sk-my-key", API_KEY)
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "docs/openai.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert "CompletionUsage" in out.getvalue() or "prompt_tokens" in out.getvalue()


# -- started by the launcher ------------------------------------------------------------------------------------
def _pids(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def test_start_script_runs_the_front_and_stops_it(tmp_path: Path, png: bytes) -> None:
    """./triton_start.sh --openai-port N --api-key-file F: the front comes up beside tritonserver (loopback), the
    key file is honoured, and SIGTERM ends both: no orphan."""
    http, grpc, metrics, port = free_ports(4)
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsk-from-file\n")
    log_path = tmp_path / "start.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_VLM_API_KEY")}
    args = ["--mode", "embedded", "--tiny", "--models", "kosmos2", "--http-port", str(http), "--grpc-port",
            str(grpc), "--metrics-port", str(metrics), "--openai-port", str(port), "--api-key-file", str(keys)]
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(ROOT / "triton_start.sh"), *args], stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 90
            while "Ctrl-C to stop" not in log_path.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.2)
            output = log_path.read_text()
            assert f"OpenAI   http://127.0.0.1:{port}/v1" in output, output[-3000:]
            fronts = _pids(f"triton_vlm.openai --host 127.0.0.1 --port {port}")
            assert len(fronts) == 1
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-from-file", max_retries=0)
            assert [m.id for m in client.models.list().data] == ["kosmos2"]
            answer = client.chat.completions.create(model="kosmos2", max_tokens=4, messages=[
                user("<grounding>An image of", png)])
            assert answer.usage is not None and answer.usage.completion_tokens <= 4
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-other", max_retries=0).models.list()
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
    assert code == 0, log_path.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while (_pids(f"--port {port}") or _pids(f"--http-port={http}")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pids(f"triton_vlm.openai --host 127.0.0.1 --port {port}"), "the OpenAI front outlived the launcher"
    assert not _pids(f"tritonserver.*--http-port={http}")
    assert "sk-from-file" not in log_path.read_text()


# -- the OpenAPI description, checked by a schema-driven fuzzer ------------------------------------------------
OPERATIONS = [("GET", "/health"), ("GET", "/health/ready"), ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
              ("POST", "/v1/chat/completions")]


@pytest.fixture(scope="module")
def openapi_schema(front: Front) -> object:
    import schemathesis

    auth = {"Authorization": f"Bearer {API_KEY}"}
    schema = schemathesis.openapi.from_url(front.root + "/openapi.json", headers=auth, timeout=30)
    schema.config.update(base_url=front.root, headers=auth, request_timeout=60)
    return schema


def test_the_fuzzer_covers_every_operation(openapi_schema: object) -> None:
    operations = [op.ok() for op in openapi_schema.get_all_operations()]  # type: ignore[attr-defined]
    found = {(op.method.upper(), op.path) for op in operations}
    assert found == set(OPERATIONS)


# Negative data only where there is something to make invalid: the GETs have no query or body, and any string
# is a valid path segment.
FUZZ_CASES = [(method, path, "positive") for method, path in OPERATIONS] + [("POST", "/v1/chat/completions",
                                                                              "negative")]


@pytest.mark.parametrize("method, path, mode", FUZZ_CASES, ids=[f"{m} {p} {g}" for m, p, g in FUZZ_CASES])
def test_openapi_fuzzing(openapi_schema: object, front: Front, method: str, path: str, mode: str) -> None:
    """schemathesis against the running front (127.0.0.1 only), 40 requests per operation (100 for the chat):
    no 5xx,
    every status, content type, header and body as /openapi.json documents them, invalid input answered 4xx,
    and the API key really checked."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis import Case, GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    operation = openapi_schema[path][method]  # type: ignore[index]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance, negative_data_rejection, ignored_auth]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    statuses: list[int] = []

    def fuzz(strategy: object, examples: int) -> None:
        @given(case=strategy)
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Case) -> None:
            assert front.root.startswith("http://127.0.0.1:")
            body = case.body
            if mode == "positive" and isinstance(body, dict) and isinstance(body.get("model"), str):
                body["model"] = "llava"  # a served model, so requests get past the model lookup to the rest
            response = case.call_and_validate(base_url=front.root, headers=auth, checks=checks,
                                              timeout=60)
            statuses.append(response.status_code)

        run()

    fuzz(operation.as_strategy(generation_mode=GenerationMode(mode)), 100 if method == "POST" else 40)
    if mode == "positive":  # the description's own examples (a real image for the chat) must work as documented
        for strategy in openapi_schema.get_strategies_from_examples(operation):  # type: ignore[attr-defined]
            fuzz(strategy, 1)
    assert statuses and all(code < 500 for code in statuses)
    if "{" in path or method == "POST":  # inputs to vary: many distinct requests
        assert len(statuses) >= 20, statuses
    if path == "/v1/chat/completions":
        assert 400 in statuses
        assert mode == "negative" or 200 in statuses, statuses


# -- structured output (issue 24): response_format through a grammar mask ---------------------------------------------
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                                  "count": {"type": "integer", "minimum": 0, "maximum": 9}},
                 "required": ["answer", "count"], "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "reply", "schema": ANSWER_SCHEMA, "strict": True}}


@pytest.mark.parametrize("model", ["llava", "qwen2_vl"])
def test_json_schema_answers_parse_and_validate(front: Front, triton: RunningServer, png: bytes, model: str) -> None:
    """Random tiny weights answer JSON that matches the schema: through the front (the engine, <model>_stream) and
    through the public batched model (TritonVLMClient), the same greedy answer."""
    messages = [user("Is there a cat? How many?", png)]
    answer = front.client().chat.completions.create(model=model, messages=messages, max_tokens=60,
                                                    response_format=JSON_SCHEMA_FORMAT)  # type: ignore[arg-type]
    content = answer.choices[0].message.content or ""
    jsonschema.validate(json.loads(content), ANSWER_SCHEMA)
    assert answer.choices[0].finish_reason == "stop"
    with TritonVLMClient(triton.http_url) as kserve:
        chat = kserve.chat_result(model, [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Is there a cat? How many?"}]}], [png], max_tokens=60,
            response_format=JSON_SCHEMA_FORMAT)
        infer = kserve.infer(model, png, "Is there a cat? How many?", max_tokens=60,
                             response_format=json.dumps(JSON_SCHEMA_FORMAT))
    assert chat.text == infer == content and chat.finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as error:
        front.client().chat.completions.create(model=model, messages=messages, response_format={  # type: ignore[arg-type]
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})
    assert _status_error(error)["param"] == "response_format"


def test_streamed_answers_whose_clients_leave_at_done_let_the_models_unload(tmp_path: Path) -> None:
    """An HTTP client that drops its connection once it has ``[DONE]`` cancels the front's task while the gRPC
    stream of its (finished) request ends. Were that cancel to reach the call, Triton 2.51 would never release the
    request, and its model would never unload: the server would exit 1 after its 30 s exit timeout. Before the drain
    was shielded (``_protocol.stream``), these 200 short streamed answers with their usage left llava_stream loaded
    in 3 runs of 3 (with the 640 x 480 sample image, 1 of 3)."""
    from tests.conftest import free_port, server_exit_report

    from triton_vlm.launcher import ServerOptions, TritonServer
    from triton_vlm.openai import OpenAIOptions
    from triton_vlm.openai.process import OpenAIFront

    http, grpc, metrics = free_ports()
    log_path = tmp_path / "tritonserver.log"
    with open(log_path, "w") as log, open(tmp_path / "front.log", "w") as front_log:
        server = TritonServer(ServerOptions(models=("llava",), tiny=True, http_port=http, grpc_port=grpc,
                                           metrics_port=metrics), log_file=log)
        server.start()
        try:
            server.wait_until_ready(timeout=180)
            options = OpenAIOptions(port=free_port(), triton_grpc_url=server.grpc_url, api_keys=(API_KEY,))
            front = OpenAIFront(options, log_file=front_log).start()
            try:
                front.wait_until_ready(timeout=60)
                client = openai.OpenAI(base_url=options.base_url, api_key=API_KEY, max_retries=0, timeout=60)
                small = io.BytesIO()
                Image.new("RGB", (64, 48), (120, 30, 60)).save(small, format="PNG")  # short requests: more ends
                for _ in range(200):
                    chunks = list(client.chat.completions.create(
                        model="llava", messages=[user("Describe it.", small.getvalue())],
                        max_completion_tokens=MAX_TOKENS,
                        stream=True, stream_options={"include_usage": True}))
                    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage is not None
            finally:
                front.stop()
        finally:
            code = server.stop()
    assert code == 0, server_exit_report(log_path, code)
    assert "model llava_stream unloaded" in log_path.read_text()
