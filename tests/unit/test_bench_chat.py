"""triton_vlm.bench.chat: what each turn sends, and what the report says (a fake client; the served run is in
tests/integration/test_bench.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

import triton_vlm.client
from triton_vlm.bench.chat import (
    CANNED_ANSWER,
    IMAGE_SEED,
    QUESTIONS,
    ChatResult,
    ChatSample,
    format_chat_table,
    run_chat,
)
from triton_vlm.bench.workload import Workload
from triton_vlm.client import StreamPiece


class FakeClient:
    """Answers turn k with ``answer-k`` in two pieces; its prompt grows with the conversation's text. Calls listed in
    ``calls``; ``fail_on_turn`` raises there."""

    calls: list[dict[str, Any]] = []
    fail_on_turn: int | None = None

    def __init__(self, url: str, **_: Any) -> None:
        self.url = url

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def chat_stream_pieces(self, model: str, messages: list[dict[str, Any]], images: list[bytes],
                           **options: Any) -> Iterator[StreamPiece]:
        turn = sum(m["role"] == "user" for m in messages)
        FakeClient.calls.append({"model": model, "messages": json.loads(json.dumps(messages)), "images": images,
                                 **options})
        if turn == FakeClient.fail_on_turn:
            raise RuntimeError("refused")
        prompt = 100 * turn
        yield StreamPiece(text="", generated_tokens=0, prompt_tokens=prompt, finish_reason="")
        yield StreamPiece(text="answer-", generated_tokens=1, prompt_tokens=prompt, finish_reason="")
        yield StreamPiece(text=str(turn), generated_tokens=options["max_tokens"], prompt_tokens=prompt,
                          finish_reason="length")


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    FakeClient.calls, FakeClient.fail_on_turn = [], None
    monkeypatch.setattr(triton_vlm.client, "TritonVLMClient", FakeClient)
    return FakeClient


def test_each_turn_resends_the_image_with_the_earlier_questions_and_answers(fake_client: type[FakeClient]) -> None:
    workload = Workload(model="llava", image_size=8, max_tokens=5, requests=2, image_seed=IMAGE_SEED)
    result = run_chat("host:8001", workload, turns=3)
    assert len(fake_client.calls) == 6 and result.errors == 0
    first, second, third = fake_client.calls[3:]
    assert [c["images"] for c in fake_client.calls[3:]] == [[workload.image(1)]] * 3  # conversation 1's own image
    assert workload.image(1) != workload.image(0) != Workload(model="llava", image_size=8).image(0)
    assert first["messages"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    assert third["messages"] == [*second["messages"], {"role": "assistant", "content": "answer-2"},
                                 {"role": "user", "content": QUESTIONS[2]}]
    assert second["messages"][0] == first["messages"][0]
    assert second["messages"][1:] == [{"role": "assistant", "content": "answer-1"},
                                      {"role": "user", "content": QUESTIONS[1]}]
    assert all(c["max_tokens"] == 5 and c["ignore_eos"] is True for c in fake_client.calls)
    assert [(s.conversation, s.turn, s.prompt_tokens, s.generated_tokens) for s in result.samples] == [
        (c, t, 100 * t, 5) for c in (0, 1) for t in (1, 2, 3)]
    assert all(0 < s.ttft_s <= s.seconds for s in result.samples)


def test_canned_answers_replace_the_models_in_later_turns(fake_client: type[FakeClient]) -> None:
    """Random weights answer with pieces that come back as text many times longer; canned answers keep turn 2's
    prompt as long as a real chat's."""
    result = run_chat("host:8001", Workload(model="llava", image_size=8, max_tokens=3, requests=1), turns=3,
                      answers="canned")
    assert result.errors == 0 and len(result.samples) == 3
    assert [m["content"] for m in fake_client.calls[-1]["messages"] if m["role"] == "assistant"] == [CANNED_ANSWER] * 2
    with pytest.raises(ValueError, match="answers must be one of model, canned"):
        run_chat("host:8001", Workload(model="llava"), turns=2, answers="echo")


def test_a_failed_turn_ends_its_conversation_and_is_counted(fake_client: type[FakeClient]) -> None:
    fake_client.fail_on_turn = 2
    result = run_chat("host:8001", Workload(model="llava", image_size=8, max_tokens=3, requests=2), turns=3)
    assert result.errors == 2 and result.first_error == "turn 2: RuntimeError: refused"
    assert [s.turn for s in result.samples] == [1, 1]
    assert math.isnan(result.ttft_s(2))
    with pytest.raises(ValueError, match="turns must be 1 to 4"):
        run_chat("host:8001", Workload(model="llava"), turns=5)


def test_the_report_has_each_turns_median_ttft_and_every_sample() -> None:
    samples = [ChatSample(conversation=c, turn=t, ttft_s=ttft, seconds=1.0, prompt_tokens=600 + 100 * t,
                          generated_tokens=64)
               for c, (t1, t2) in enumerate([(0.040, 0.010), (0.050, 0.012), (0.045, 0.030)])
               for t, ttft in ((1, t1), (2, t2))]
    result = ChatResult(turns=2, conversations=3, samples=samples)
    report = result.as_json()
    assert (report["turn1_ttft_s"], report["turn2_ttft_s"]) == (0.045, 0.012)
    assert report["turns"][1] == {"turn": 2, "question": QUESTIONS[1], "samples": 3, "ttft_p50_s": 0.012,
                                  "ttft_min_s": 0.010, "ttft_max_s": 0.030, "prompt_tokens_p50": 800.0,
                                  "phases_p50_s": {}}  # runs that could not read the server's metrics
    assert len(report["samples"]) == 6 and report["samples"][1]["ttft_s"] == 0.010 and report["errors"] == 0
    table = format_chat_table("chat", result)
    assert "   2           800    12.0ms" in table and "turn 2 0.27" in table and "on the server" not in table
    # With the server's split of each turn's first token: its medians, phase by phase, in the report and the table.
    split = [replace(s, phases={"prepare": 0.001 * (s.conversation + 1), "prefill": 0.02 / s.turn}) for s in samples]
    report = ChatResult(turns=2, conversations=3, samples=split).as_json()
    assert report["turns"][1]["phases_p50_s"] == {"prepare": 0.002, "prefill": 0.01}
    table = format_chat_table("chat", ChatResult(turns=2, conversations=3, samples=split))
    assert "turn 1 on the server, p50 ms: prepare 2.0, prefill 20.0" in table


def test_engine_counters_are_the_stream_models_from_its_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton_vlm.observability.scrape as scrape
    from triton_vlm.bench.chat import engine_counters

    text = "\n".join([
        '# TYPE triton_vlm_engine_tokens_total counter',
        'triton_vlm_engine_tokens_total{model="llava_stream",phase="prefill"} 1200',
        'triton_vlm_engine_tokens_total{model="llava_stream",phase="decode"} 64',
        'triton_vlm_engine_tokens_total{model="llava_next_stream",phase="prefill"} 99',
        'triton_vlm_prefix_cache_requests_total{model="llava_stream",result="hit"} 3',
        'triton_vlm_prefix_cache_requests_total{model="llava_stream",result="miss"} 5',
        'triton_vlm_prefix_cache_tokens_total{model="llava_stream"} 1872'])
    monkeypatch.setattr(scrape, "fetch_metrics", lambda url: text if url == "host:8002/metrics" else "")
    assert engine_counters("host:8002", "llava") == {"prefill_tokens": 1200.0, "prefix_cache_hits": 3.0,
                                                     "prefix_cache_misses": 5.0, "prefix_cached_tokens": 1872.0}
    assert engine_counters("host:8002/metrics", "llava_next") == {"prefill_tokens": 99.0}  # no prefix cache exported
