"""The chat benchmark: time to first token, turn after turn, of conversations about one image each.

A conversation sends its image with every turn, as a chat client does: turn k's ``messages`` are the earlier
questions with the model's answers, then question k (``TritonVLMClient.chat_stream_pieces``, streamed from
``<model>_stream``). One request is in flight at a time, so a turn's TTFT is that turn's own prefill on an otherwise
idle server; EOS is ignored, so every answer is ``max_tokens`` tokens and turn k's prompt is about as long in every
conversation. With a prefix cache, a later turn prefills only what the cache does not hold: the new question, and the
earlier answer where its text comes back as other tokens than those generated (a canned answer always does).

The answers a later turn sends back are the model's own (``answers="model"``), or :data:`CANNED_ANSWER`
(``"canned"``): a random-weight checkpoint answers with pieces its small tokenizer spells out many times longer when
they come back as text (llava's 7B stand-in: 64 tokens come back as about 560), which no real model's answer does.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from triton_vlm.bench.workload import DEFAULT_PROMPT, Workload, median, ms_column
from triton_vlm.observability.phases import FIRST_TOKEN_PHASES, PHASE_METRIC

#: Turn k asks ``QUESTIONS[k - 1]``.
QUESTIONS = (
    DEFAULT_PROMPT,
    "What is in the top left of the picture?",
    "How many objects are there? Answer with one word.",
    "What color is the fruit on the table?",
)
#: What a later turn sends as each earlier answer with ``answers="canned"``: plain English of 45 words, 63 tokens in
#: the random checkpoints' tokenizer (about 55 in Llama's), as long as a short real answer.
CANNED_ANSWER = ("The picture is a photo of a busy city street at night. On the left a cat is sitting on a red mat by "
                 "a window, and at the bottom there is a bowl of fruit with apples, bananas and oranges on a wooden "
                 "table.")
ANSWERS = ("model", "canned")
#: The conversations' images: seeds far from the standard benchmark's (0, 1, ...) and its warm-up's, so that a
#: server that ran it has none of them in a prefix cache. The chat warm-up takes the seed just below.
IMAGE_SEED = 2_000_000


@dataclass(frozen=True)
class ChatSample:
    """One turn of one conversation."""

    conversation: int
    turn: int
    ttft_s: float
    seconds: float
    prompt_tokens: int
    generated_tokens: int
    #: The server's split of this turn's time to first token (``triton_vlm_first_token_phase_seconds``), where the
    #: benchmark could read its metrics.
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class ChatResult:
    """Every turn of every conversation, and the errors (a failed turn ends its conversation)."""

    turns: int
    conversations: int
    samples: list[ChatSample] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None

    def of_turn(self, turn: int) -> list[ChatSample]:
        return [s for s in self.samples if s.turn == turn]

    def ttft_s(self, turn: int) -> float:
        """Turn ``turn``'s median TTFT over the conversations (NaN where none got that far)."""
        return median([s.ttft_s for s in self.of_turn(turn)])

    def as_json(self) -> dict[str, Any]:
        per_turn = []
        for turn in range(1, self.turns + 1):
            samples = self.of_turn(turn)
            ttfts = [s.ttft_s for s in samples]
            phases = [phase for phase in FIRST_TOKEN_PHASES if all(phase in s.phases for s in samples)]
            per_turn.append({"turn": turn, "question": QUESTIONS[turn - 1], "samples": len(samples),
                             "ttft_p50_s": median(ttfts), "ttft_min_s": min(ttfts, default=float("nan")),
                             "ttft_max_s": max(ttfts, default=float("nan")),
                             "prompt_tokens_p50": median([float(s.prompt_tokens) for s in samples]),
                             # The server's split of the TTFT, phase by phase (medians; where it was read).
                             "phases_p50_s": {phase: median([s.phases[phase] for s in samples])
                                              for phase in phases} if samples else {}})
        return {**{f"turn{turn}_ttft_s": self.ttft_s(turn) for turn in range(1, self.turns + 1)},
                "turns": per_turn, "samples": [asdict(s) for s in self.samples],
                "errors": self.errors, "first_error": self.first_error}


def run_chat(grpc_url: str, workload: Workload, turns: int, answers: str = "model",
             timeout: float = 600.0, metrics_url: str | None = None) -> ChatResult:
    """``workload.requests`` conversations of ``turns`` turns, one after another, each about its own image
    (``workload.image(i)``), ``workload.max_tokens`` tokens a turn; later turns send back ``answers`` (``model``:
    the model's, ``canned``: :data:`CANNED_ANSWER`). With ``metrics_url``, each turn also gets the server's split
    of its time to first token (read between turns, so outside the timed part)."""
    from triton_vlm.client import TritonVLMClient

    if not 1 <= turns <= len(QUESTIONS):
        raise ValueError(f"turns must be 1 to {len(QUESTIONS)}, got {turns}")
    if answers not in ANSWERS:
        raise ValueError(f"answers must be one of {', '.join(ANSWERS)}, got {answers!r}")
    result = ChatResult(turns=turns, conversations=workload.requests)
    with TritonVLMClient(grpc_url, protocol="grpc", timeout=timeout) as client:
        for conversation in range(workload.requests):
            image = workload.image(conversation)
            messages: list[dict[str, Any]] = []
            for turn in range(1, turns + 1):
                question = QUESTIONS[turn - 1]
                # The image goes with the first question, as a user asks about it; it is sent with every turn.
                content: Any = [{"type": "image"}, {"type": "text", "text": question}] if turn == 1 else question
                messages.append({"role": "user", "content": content})
                try:
                    before = phase_sums(metrics_url, workload.model) if metrics_url else {}
                    sample, answer = _turn(client, workload, messages, image, conversation, turn)
                    if metrics_url:
                        after = phase_sums(metrics_url, workload.model)
                        sample = replace(sample, phases={phase: after[phase] - before.get(phase, 0.0)
                                                         for phase in after})
                except Exception as exc:  # counted, not fatal: a benchmark reports errors
                    result.errors += 1
                    result.first_error = result.first_error or f"turn {turn}: {type(exc).__name__}: {exc}"[:500]
                    break
                result.samples.append(sample)
                messages.append({"role": "assistant", "content": CANNED_ANSWER if answers == "canned" else answer})
    return result


def _turn(client: Any, workload: Workload, messages: list[dict[str, Any]], image: bytes, conversation: int,
          turn: int) -> tuple[ChatSample, str]:
    """One streamed turn: its sample and the answer's text."""
    start = time.perf_counter()
    ttft = float("nan")
    pieces: list[str] = []
    prompt_tokens = generated = 0
    for piece in client.chat_stream_pieces(workload.model, messages, [image], max_tokens=workload.max_tokens,
                                           ignore_eos=True):
        if generated == 0 and piece.generated_tokens > 0:
            ttft = time.perf_counter() - start
        pieces.append(piece.text)
        prompt_tokens, generated = max(prompt_tokens, piece.prompt_tokens), piece.generated_tokens
    seconds = time.perf_counter() - start
    if generated == 0:
        raise RuntimeError("the stream ended without a token")
    return ChatSample(conversation=conversation, turn=turn, ttft_s=ttft, seconds=seconds,
                      prompt_tokens=prompt_tokens, generated_tokens=generated), "".join(pieces)


#: What the engine says it did, from ``<model>_stream``'s metrics: ``(metric, labels)`` by report key.
ENGINE_COUNTERS = {
    "prefill_tokens": ("triton_vlm_engine_tokens_total", {"phase": "prefill"}),
    "prefix_cache_hits": ("triton_vlm_prefix_cache_requests_total", {"result": "hit"}),
    "prefix_cache_misses": ("triton_vlm_prefix_cache_requests_total", {"result": "miss"}),
    "prefix_cached_tokens": ("triton_vlm_prefix_cache_tokens_total", {}),
}


def engine_counters(metrics_url: str, model: str) -> dict[str, float]:
    """:data:`ENGINE_COUNTERS` of ``<model>_stream`` now (those its server exports: the prefix cache's came with
    it). The engine publishes them every 0.25 s: read them half a second after the last request."""
    return _stream_model_values(metrics_url, model, ENGINE_COUNTERS)


def phase_sums(metrics_url: str, model: str) -> dict[str, float]:
    """The seconds ``<model>_stream`` has counted in each phase of its requests' first tokens so far (a server
    without the metric: none)."""
    return _stream_model_values(metrics_url, model, {phase: (f"{PHASE_METRIC}_sum", {"phase": phase})
                                                     for phase in FIRST_TOKEN_PHASES})


def _stream_model_values(metrics_url: str, model: str,
                         wanted: dict[str, tuple[str, dict[str, str]]]) -> dict[str, float]:
    """``wanted`` (``key: (metric, labels)``) of ``<model>_stream``, scraped once from ``metrics_url``: the keys
    its server exports."""
    from triton_vlm.observability.scrape import fetch_metrics, parse_metrics, value_of

    url = metrics_url if metrics_url.rstrip("/").endswith("/metrics") else metrics_url.rstrip("/") + "/metrics"
    samples = parse_metrics(fetch_metrics(url))
    found = {key: value_of(samples, name, model=f"{model}_stream", **labels) for key, (name, labels) in wanted.items()}
    return {key: value for key, value in found.items() if value is not None}


def warm_up_chat(grpc_url: str, workload: Workload, turns: int, answers: str = "model") -> ChatResult:
    """One unmeasured conversation about an image of its own (the first turns after a start pay for compilation
    and first-call allocations)."""
    return run_chat(grpc_url, replace(workload, requests=1, image_seed=workload.image_seed - 1), turns, answers)


def format_chat_table(title: str, result: ChatResult) -> str:
    lines = [title, f"{'turn':>4} {'prompt tokens':>13} {'TTFT p50':>9} {'TTFT min':>9} {'TTFT max':>9} {'samples':>7}"]
    for row in result.as_json()["turns"]:
        lines.append(f"{row['turn']:>4} {row['prompt_tokens_p50']:>13.0f} {ms_column(row['ttft_p50_s'], 1)} "
                     f"{ms_column(row['ttft_min_s'], 1)} {ms_column(row['ttft_max_s'], 1)} {row['samples']:>7}")
    for row in result.as_json()["turns"]:
        if row["phases_p50_s"]:
            lines.append(f"turn {row['turn']} on the server, p50 ms: " + ", ".join(
                f"{phase} {seconds * 1e3:.1f}" for phase, seconds in row["phases_p50_s"].items()))
    if result.turns > 1:
        lines.append("TTFT over turn 1's: " + ", ".join(
            f"turn {t} {result.ttft_s(t) / result.ttft_s(1):.2f}" for t in range(2, result.turns + 1)))
    if result.errors:
        lines.append(f"errors: {result.errors} (first: {result.first_error})")
    return "\n".join(lines)
