"""Structured output (``response_format``): parsing, the per-row token mask, and JSON that parses and matches its
schema from the batched loop and the engine, with tiny random weights (the mask alone makes it so)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch
from PIL import Image

from triton_vlm.direct import direct_runtime
from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.errors import InvalidInputError
from triton_vlm.models.generation import generate_batch
from triton_vlm.runtime import VLMRuntime
from triton_vlm.sampling import SamplingParams, choose_tokens, make_generator
from triton_vlm.structured import GRAMMAR_CACHE_SIZE, GrammarState, ResponseFormat, grammars_for, mask_logits

from .helpers import rgb_array

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["answer", "count", "ok"],
    "additionalProperties": False,
}
FORMAT = json.dumps({"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}})
IMAGE = Image.fromarray(rgb_array(48, 40, seed=3))


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def loaded(request: pytest.FixtureRequest, llava_runtime: VLMRuntime) -> Any:
    runtime = llava_runtime if request.param == "llava" else direct_runtime("qwen2_vl", tiny=True, device="cpu")
    return runtime.ensure_loaded()


def fmt() -> ResponseFormat:
    parsed = ResponseFormat.parse(FORMAT)
    assert parsed is not None
    return parsed


@pytest.mark.parametrize("text", [
    "not json", "[]", '{"type": "xml"}', '{"type": "json_schema"}', '{"type": "json_schema", "json_schema": {}}',
    '{"type": "json_schema", "json_schema": {"schema": 3}}'])
def test_a_bad_response_format_is_invalid_arg_naming_it(text: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        ResponseFormat.parse(text)
    assert caught.value.param == "response_format"


def test_response_format_kinds() -> None:
    assert ResponseFormat.parse(None) is None
    assert ResponseFormat.parse('{"type": "text"}') is None
    assert ResponseFormat.parse('{"type": "json_object"}') == ResponseFormat("json_object")
    assert fmt().kind == "json_schema" and json.loads(fmt().schema or "") == SCHEMA


def test_a_schema_xgrammar_cannot_compile_is_invalid_arg(llava_runtime: VLMRuntime) -> None:
    loaded = llava_runtime.ensure_loaded()
    grammars = grammars_for(loaded.processor.tokenizer, {2})
    bad = ResponseFormat("json_schema", json.dumps({"type": "no-such-type"}))
    with pytest.raises(InvalidInputError) as caught:
        grammars.compile(bad)
    assert caught.value.param == "response_format"


def test_compiled_grammars_are_cached_by_schema_and_bounded(llava_runtime: VLMRuntime) -> None:
    grammars = grammars_for(llava_runtime.ensure_loaded().processor.tokenizer, {2})
    assert grammars.compile(fmt()) is grammars.compile(fmt())
    for n in range(GRAMMAR_CACHE_SIZE + 3):
        grammars.compile(ResponseFormat("json_schema", json.dumps({"type": "integer", "maximum": n})))
    assert len(grammars) == GRAMMAR_CACHE_SIZE


def test_a_row_never_samples_a_token_its_mask_forbids(llava_runtime: VLMRuntime) -> None:
    loaded = llava_runtime.ensure_loaded()
    tokenizer = loaded.processor.tokenizer
    grammars = grammars_for(tokenizer, {tokenizer.eos_token_id})
    vocab = loaded.model.config.text_config.vocab_size
    # JSON must open with "{": the most likely token of the constrained rows is a forbidden one ("x").
    forbidden = tokenizer.convert_tokens_to_ids("x")
    logits = torch.zeros(3, vocab)
    logits[:, forbidden] = 50.0
    states = [GrammarState(grammars.compile(fmt())), None, GrammarState(grammars.compile(fmt()))]
    mask_logits(logits, states)
    assert logits[0, forbidden] == float("-inf") and logits[2, forbidden] == float("-inf")
    assert logits[1, forbidden] == 50.0 and torch.isfinite(logits[1]).all()  # the unconstrained row is untouched
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0, seed=1)]
    for _ in range(20):
        tokens = choose_tokens(logits.clone(), params, [make_generator(p, torch.device("cpu")) for p in params])
        assert tokens[1] == forbidden
        for row in (0, 2):
            assert tokens[row] != forbidden
            assert tokenizer.decode([int(tokens[row])]).lstrip().startswith("{")


def check_answers(texts: list[str]) -> None:
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_the_batched_loop_answers_json_that_matches_the_schema(loaded: Any) -> None:
    params = [SamplingParams(max_tokens=60, response_format=fmt()),
              SamplingParams(max_tokens=60, temperature=1.0, seed=7, response_format=fmt()),
              SamplingParams(max_tokens=8),  # an unconstrained row in the same batch
              SamplingParams(max_tokens=4, response_format=fmt())]  # cut mid-JSON
    outputs = generate_batch(loaded.family, loaded.model, loaded.processor, [IMAGE] * 4, ["Describe it."] * 4,
                             params)
    check_answers([o.text for o in outputs[:2]])
    assert [o.finish_reason for o in outputs[:2]] == ["stop", "stop"]
    assert outputs[3].finish_reason == "length" and len(outputs[3].token_ids) == 4
    with pytest.raises(ValueError):
        json.loads(outputs[3].text)


def test_the_engine_answers_json_that_matches_the_schema(loaded: Any) -> None:
    engine = LLMEngine(loaded.family, loaded.model, loaded.processor, EngineConfig(max_model_len=256))
    params = [SamplingParams(max_tokens=60, response_format=fmt()),
              SamplingParams(max_tokens=60, temperature=1.0, seed=7, response_format=fmt()),
              SamplingParams(max_tokens=8)]
    results = engine.generate([(IMAGE, "Describe it.", p) for p in params])
    texts = [loaded.family.decode_text(loaded.processor, ids) for ids in results]
    check_answers(texts[:2])
    # The same answers as the batched loop (greedy, and seeded: each row's own generator).
    batched = generate_batch(loaded.family, loaded.model, loaded.processor, [IMAGE] * 3, ["Describe it."] * 3, params)
    assert results == [list(o.token_ids) for o in batched]


def test_runtime_reads_response_format_and_refuses_a_bad_one(llava_runtime: VLMRuntime) -> None:
    request = llava_runtime.make_chat_request('[{"role": "user", "content": "hi"}]', response_format=FORMAT)
    assert request.params.response_format == fmt()
    with pytest.raises(InvalidInputError) as caught:
        llava_runtime.make_chat_request('[{"role": "user", "content": "hi"}]', response_format='{"type": 1}')
    assert caught.value.param == "response_format"


def test_moondream2_refuses_response_format_naming_it() -> None:
    runtime = direct_runtime("moondream2", tiny=True, device="cpu")  # not loaded: refused while validating
    with pytest.raises(InvalidInputError) as caught:
        runtime.make_request(b"", "hi", response_format=FORMAT)
    assert caught.value.param == "response_format" and "moondream2" in str(caught.value)
