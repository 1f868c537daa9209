"""Issue 24's sampling and output options: penalties against their reference formulas, logprobs against log_softmax,
stop strings (also spanning tokens), n, and the engine giving the batched loop's tokens and logprobs with them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from triton_vlm.config import EngineConfig
from triton_vlm.detokenizer import IncrementalDetokenizer, held_token_ids
from triton_vlm.engine import LLMEngine, RequestOutput
from triton_vlm.errors import InvalidInputError
from triton_vlm.models.generation import GenerationOutput, generate_batch
from triton_vlm.runtime import VLMRuntime
from triton_vlm.sampling import (
    RowSampler,
    SamplingParams,
    StopMatcher,
    find_stop,
    penalize,
    safe_length,
    step_logprobs,
)

from .helpers import counting, load_tiny, rgb_array, spy_detokenize

IMAGES = [Image.fromarray(rgb_array(40, 30, seed=0)), Image.fromarray(rgb_array(64, 64, seed=1))]
PROMPTS = ["What is this?", "describe the picture in detail please"]


def reference_penalties(logits: list[float], generated: list[int], prompt: list[int], p: SamplingParams) -> list[float]:
    """HF's RepetitionPenaltyLogitsProcessor, then OpenAI's documented formula, one token at a time."""
    out = list(logits)
    for token in set(generated) | set(prompt):
        out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
    for token in set(generated):
        out[token] -= p.frequency_penalty * generated.count(token) + p.presence_penalty
    return out


def test_penalties_match_the_reference_formulas_per_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 12)
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=0.3),
              SamplingParams(repetition_penalty=1.8), SamplingParams()]
    generated = [[1, 1, 4, 7, 1], [2, 3, 3], [5]]
    prompts = [[0, 9], [9, 11, 2], [6]]
    counts = torch.zeros(3, 12)
    seen = torch.zeros(3, 12, dtype=torch.bool)
    for row in range(3):
        for token in generated[row]:
            counts[row, token] += 1
        seen[row, prompts[row]] = True
    got = penalize(logits, params, counts, seen)
    for row in range(3):
        expected = reference_penalties(logits[row].tolist(), generated[row], prompts[row], params[row])
        assert got[row].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(got[2], logits[2])  # no penalties: unchanged


def test_logprobs_are_log_softmax_of_the_raw_logits_with_the_top_alternatives() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 50) * 3
    params = [SamplingParams(logprobs=True, top_logprobs=5, temperature=0.7, seed=3),
              SamplingParams(logprobs=True, frequency_penalty=2.0)]
    sampler = RowSampler(params, torch.device("cpu"), 50, torch.zeros(2, 1, dtype=torch.long))
    tokens = sampler(logits)
    reference = torch.log_softmax(logits, dim=-1)
    first, second = sampler.logprobs[0][0], sampler.logprobs[1][0]
    assert first.token_id == int(tokens[0]) and first.logprob == pytest.approx(float(reference[0, tokens[0]]))
    assert [i for i, _ in first.top] == reference[0].topk(5).indices.tolist()
    assert [v for _, v in first.top] == pytest.approx(reference[0].topk(5).values.tolist())
    assert second.top == () and second.logprob == pytest.approx(float(reference[1].max()))
    # The step's own helper gives the same, and only rows that ask get entries.
    rows = step_logprobs(logits, tokens, [params[0], SamplingParams()]).rows([params[0], SamplingParams()])
    assert rows[0] == first and rows[1] is None


def test_stop_strings_find_the_first_and_hold_back_a_possible_start() -> None:
    assert find_stop("a cat. A dog.", (".", "dog")) == 5
    assert find_stop("a cat", ("dog",)) is None
    assert safe_length("the end of th", ("the stop",)) == len("the end of ")  # "th" may become "the stop"
    assert safe_length("the end of the st", ("the stop", "x")) == len("the end of ")
    assert safe_length("nothing to hold", ("zz",)) == len("nothing to hold")
    assert safe_length("ab", ("abc", "b")) == 0  # the longest possible start wins


# -- StopMatcher: a stop string in a growing token list's text, a few tokens decoded per step -------------------
#: (answer, stop strings): spanning tokens, several (the earliest wins), at the very start, multi-byte characters
#: (over byte tokens where the tiny tokenizers have no merge for them), with spaces at their ends, and none found.
STOP_CASES = [
    (" one two three four five six seven", ("ree fou",)),
    (" one two three four five six seven", ("five", "two", "three")),
    (" one two three four five six seven", ("one",)),
    (" one two three four five six seven", ("o t", "e f")),
    (" one two three four five six seven", ("four ", " six")),
    (" one two three four five six seven", ("eight", "nine")),
    ("café naïve — 日本語の文 🙂 done", ("日本",)),
    ("café naïve — 日本語の文 🙂 done", ("🙂", "é n")),
    ("café naïve — 日本語の文 🙂 done", ("\u6587 \U0001f642 d", "xyz")),
    ("First line.\nSecond line.\n\nThird", ("\n",)),
    ("First line.\nSecond line.\n\nThird", ("\n\n", "ond")),
]


@pytest.fixture(scope="module", params=["llava", "moondream2"])
def answer_text(request: pytest.FixtureRequest) -> tuple[Callable[[str], list[int]], Any, Any]:
    """(encode, the family, its processor) of a tiny checkpoint: llava's tokenizer has byte-fallback tokens,
    moondream2's is byte-level."""
    family, _model, processor = load_tiny(request.param)
    tokenizer: Any = processor.tokenizer
    if request.param == "llava":
        return (lambda text: tokenizer.encode(text, add_special_tokens=False)), family, processor
    return tokenizer.encode, family, processor


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(STOP_CASES), steps=st.lists(st.integers(1, 3), min_size=1, max_size=60))
def test_the_stop_matcher_finds_what_a_search_of_the_whole_text_finds_at_every_step(
        answer_text: Any, case: tuple[str, tuple[str, ...]], steps: list[int]) -> None:
    """What both decode routes did before it, a whole decode and a search of ``decode_text`` at every step, finds the
    same stop string at the same step, at the same index of the answer text, however many tokens each step adds."""
    encode, family, processor = answer_text
    text, stop = case
    ids = list(encode(text))
    matcher = family.stop_matcher(processor, stop)
    end = 0
    for step in [*steps, len(ids)]:
        end = min(len(ids), end + step)
        expected = find_stop(family.decode_text(processor, ids[:end]), stop)
        assert matcher.update(ids[:end]) == expected, (end, family.decode_text(processor, ids[:end]))
        if expected is not None:  # a found stop string stays found, whatever comes after
            assert matcher.update(ids) == expected
            return
    assert find_stop(family.decode_text(processor, ids), stop) is None


@pytest.mark.parametrize(("text", "stop", "before"), [
    (" one two three four five", ("ree fou",), "one two th"),  # spans "three" and "four"
    (" one two three four five", ("four", "two"), "one "),  # the earliest wins, not the first given
    (" one two three four five", ("one",), ""),  # at the very start: an empty answer
    ("café naïve — 日本語の文 🙂 done", ("本語の",), "café naïve — 日"),  # characters of 3 UTF-8 bytes
    ("café naïve — 日本語の文 🙂 done", ("🙂 d", "é"), "caf"),
])
def test_the_answer_ends_right_before_the_earliest_stop_string(answer_text: Any, text: str, stop: tuple[str, ...],
                                                               before: str) -> None:
    encode, family, processor = answer_text
    ids = list(encode(text))
    matcher = family.stop_matcher(processor, stop)
    found = [at for end in range(1, len(ids) + 1) if (at := matcher.update(ids[:end])) is not None]
    assert found and family.decode_text(processor, ids)[:found[0]] == before
    # Found as soon as the tokens so far hold it, and for good.
    first = next(end for end in range(1, len(ids) + 1)
                 if find_stop(family.decode_text(processor, ids[:end]), stop) is not None)
    assert found == [len(before)] * (len(ids) - first + 1)


def test_of_several_stop_strings_in_the_text_the_earliest_wins(answer_text: Any) -> None:
    """All the tokens in one step (a merged delta): the earliest in the text, wherever it is in ``stop``."""
    encode, family, processor = answer_text
    ids = list(encode(" one two three four five"))
    assert family.stop_matcher(processor, ("five", "two", "three")).update(ids) == len("one ")
    assert family.stop_matcher(processor, ("five", "two", "one two th")).update(ids) == 0
    assert family.stop_matcher(processor, ("wo t", "o three")).update(ids) == len("one t")


def test_the_stop_matcher_decodes_a_few_tokens_a_step(answer_text: Any) -> None:
    """Not a whole decode (or search) of the answer at each step: O(n) tokenizer work per answer, not O(n^2)."""
    encode, family, processor = answer_text
    ids = list(encode(" ".join(f"word{i % 37} café, 日本" for i in range(60)) + " done"))
    spy, sizes = counting(lambda token_ids: family.detokenize(processor, token_ids))
    matcher = StopMatcher(("never there",), IncrementalDetokenizer(spy, held_token_ids(processor.tokenizer)))
    for end in range(1, len(ids) + 1):
        assert matcher.update(ids[:end]) is None
    assert matcher.text == family.decode_text(processor, ids)
    assert len(ids) > 300 and sum(sizes) < 12 * len(ids)  # a whole decode per token would be ~len(ids)^2 / 2


def test_a_family_that_rewrites_its_text_is_matched_on_its_whole_text(kosmos2_runtime: VLMRuntime) -> None:
    """kosmos2's ``decode_text`` drops its grounding tags: no plain decode, so each step decodes it all."""
    loaded = kosmos2_runtime.ensure_loaded()
    family, processor = kosmos2_runtime.family, loaded.processor
    tokenizer = processor.tokenizer
    tags = tokenizer.convert_tokens_to_ids
    ids = [tags("<phrase>"), *tokenizer(" a dog", add_special_tokens=False).input_ids, tags("</phrase>"),
           *tokenizer(" runs on the grass", add_special_tokens=False).input_ids]
    matcher = family.stop_matcher(processor, ("dog runs",))
    found = [matcher.update(ids[:end]) for end in range(1, len(ids) + 1)]
    answer = family.decode_text(processor, ids)
    assert "<phrase>" not in answer and "dog runs" in answer
    assert found[-1] == answer.index("dog runs") and found[0] is None


@pytest.mark.parametrize("field, value, param", [
    ("stop", ("a", "b", "c", "d", "e"), "stop"), ("stop", ("",), "stop"), ("n", 9, "n"), ("n", 0, "n"),
    ("top_logprobs", 21, "top_logprobs"), ("presence_penalty", 2.5, "presence_penalty"),
    ("frequency_penalty", math.nan, "frequency_penalty"), ("repetition_penalty", 0.0, "repetition_penalty")])
def test_limits_are_invalid_arg_naming_the_field(field: str, value: Any, param: str) -> None:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(InvalidInputError) as raised:
        SamplingParams(**{field: value, **extra})
    assert raised.value.param == param and raised.value.code == "INVALID_ARG"


# -- the batched loop and the engine with the tiny llava -------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(llava_runtime: VLMRuntime) -> Any:
    return llava_runtime.ensure_loaded()


def batched(loaded: Any, params: list[SamplingParams]) -> list[GenerationOutput]:
    return generate_batch(loaded.family, loaded.model, loaded.processor, IMAGES[:len(params)], PROMPTS[:len(params)],
                          params)


def engine_outputs(loaded: Any, params: list[SamplingParams]) -> list[list[RequestOutput]]:
    engine = LLMEngine(loaded.family, loaded.model, loaded.processor, EngineConfig(max_model_len=256, max_num_seqs=2))
    outputs: list[list[RequestOutput]] = [[] for _ in params]
    for i, p in enumerate(params):
        engine.submit(engine.prepare(IMAGES[i], PROMPTS[i], p, outputs[i].append))
    while not all(o and o[-1].finished for o in outputs):
        engine._drain(block=False)
        engine.step()
    return outputs


def test_penalties_change_greedy_output_and_the_engine_gives_the_same_tokens_and_logprobs(loaded: Any) -> None:
    plain = batched(loaded, [SamplingParams(max_tokens=12, ignore_eos=True)] * 2)
    # Random weights rarely repeat a token, so penalties that reward repeats show: a negative frequency and presence
    # penalty, and a repetition penalty below 1 (prompt tokens count too).
    penalized = [SamplingParams(max_tokens=12, ignore_eos=True, frequency_penalty=-2.0, presence_penalty=-1.0,
                                logprobs=True, top_logprobs=3),
                 SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=0.05, logprobs=True)]
    got = batched(loaded, penalized)
    for before, after in zip(plain, got, strict=True):
        assert before.token_ids != after.token_ids
        assert len(after.logprobs) == len(after.token_ids)
        assert [e.token_id for e in after.logprobs] == list(after.token_ids)
    assert len(set(got[0].token_ids)) < len(set(plain[0].token_ids))  # rewarded repeats: fewer distinct tokens
    engine = engine_outputs(loaded, penalized)
    for outputs, expected in zip(engine, got, strict=True):
        assert [t for o in outputs for t in o.new_token_ids] == list(expected.token_ids)
        entries = [e for o in outputs for e in o.logprobs]
        assert [e.token_id for e in entries] == [e.token_id for e in expected.logprobs]
        assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-4)
        assert [[i for i, _ in e.top] for e in entries] == [[i for i, _ in e.top] for e in expected.logprobs]


def test_the_first_logprob_is_log_softmax_of_the_prefill_logits(loaded: Any) -> None:
    (out,) = batched(loaded, [SamplingParams(max_tokens=3, ignore_eos=True, logprobs=True, top_logprobs=2)])
    family, model, processor = loaded.family, loaded.model, loaded.processor
    inputs = family.encode(processor, [[IMAGES[0]]], [family.render_input(processor, PROMPTS[0], None)])
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1].float()
    reference = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert first.token_id == int(reference.argmax())
    assert first.logprob == pytest.approx(float(reference.max()), abs=1e-4)
    assert [i for i, _ in first.top] == reference.topk(2).indices.tolist()


def test_a_stop_string_spanning_tokens_cuts_the_answer_exactly_before_it(loaded: Any) -> None:
    (full,) = batched(loaded, [SamplingParams(max_tokens=16, ignore_eos=True)])
    tokenizer = loaded.processor.tokenizer
    pieces = [tokenizer.decode(list(full.token_ids[:k]), skip_special_tokens=True).strip() for k in range(17)]
    # A stop string that starts inside one token's text and ends inside a later one's.
    k = next(k for k in range(4, 16) if len(pieces[k]) - len(pieces[k - 2]) >= 3 and len(pieces[k - 2]) > 2)
    start = len(pieces[k - 2]) - 1
    stop = full.text[start:len(pieces[k - 1]) + 1]
    assert full.text.find(stop) == start or full.text.find(stop) < start
    expected = full.text[:full.text.find(stop)]
    (cut,) = batched(loaded, [SamplingParams(max_tokens=16, ignore_eos=True, stop=(stop,))])
    assert cut.text == expected and cut.finish_reason == "stop" and len(cut.token_ids) < 16
    assert full.text.startswith(cut.text + stop)
    # The row ends at the very token that completes the stop string in its text.
    assert len(cut.token_ids) == next(k for k in range(17) if stop in pieces[k])


def test_the_batched_loop_looks_for_stop_strings_a_few_tokens_a_step(loaded: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = spy_detokenize(monkeypatch, loaded.family)
    (out,) = batched(loaded, [SamplingParams(max_tokens=160, ignore_eos=True, stop=("never in it",))])
    assert out.finish_reason == "length" and len(out.token_ids) == 160
    assert sizes[-1] == 160  # the answer: one decode of it all
    assert sum(sizes[:-1]) < 12 * 160  # a whole decode a step: ~160^2 / 2


@pytest.fixture(scope="module")
def qwen2_vl_runtime() -> VLMRuntime:
    from .conftest import _runtime

    runtime: VLMRuntime = _runtime("qwen2_vl")
    return runtime


@pytest.fixture(scope="module")
def moondream2_runtime() -> VLMRuntime:
    from .conftest import _runtime

    runtime: VLMRuntime = _runtime("moondream2")
    return runtime


# qwen2_vl: multimodal RoPE positions [3, rows, len]; smolvlm: Idefics3 with image splitting; moondream2: its own
# model code and KV cache.
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "smolvlm", "moondream2"])
def test_n_choices_prefill_once_are_seeded_reproducible_and_differ(family: str, request: pytest.FixtureRequest,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    runtime: VLMRuntime = request.getfixturevalue(f"{family}_runtime")
    loaded = runtime.ensure_loaded()
    prefills: list[int] = []
    prefill = loaded.family.prefill

    def counting(model: Any, inputs: Any, positions: Any, cache: Any) -> Any:
        prefills.append(int(inputs["input_ids"].shape[0]))
        return prefill(model, inputs, positions, cache)

    monkeypatch.setattr(loaded.family, "prefill", counting)
    asked = runtime.make_request(_png(), "What is this?", max_tokens=8, temperature=1.0, seed=5, n=3)
    other = runtime.make_request(_png(), "Describe it.", max_tokens=4)
    first, plain = runtime.generate([asked, other])
    assert prefills == [2]  # one prefill for both requests' prompts: the three choices share it
    (again,) = runtime.generate([asked])
    assert isinstance(first, GenerationOutput) and isinstance(again, GenerationOutput)
    assert isinstance(plain, GenerationOutput) and not plain.choices
    choices = [first.token_ids, *(c.token_ids for c in first.choices)]
    assert choices == [again.token_ids, *(c.token_ids for c in again.choices)] and len(set(choices)) == 3
    # Choice i is what the request seeded seed + i gives alone (the copied KV is the prompt's own).
    alone = runtime.generate([runtime.make_request(_png(), "What is this?", max_tokens=8, temperature=1.0, seed=s)
                              for s in (5, 6, 7)])
    assert [o.token_ids for o in alone if isinstance(o, GenerationOutput)] == choices


def _png() -> bytes:
    from .helpers import image_bytes
    return image_bytes(40, 30)
