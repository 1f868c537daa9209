"""Structured output on CUDA: the graphed engine (its decode logits masked per row) and the batched loop answer
JSON that matches the schema, the same tokens both ways."""

from __future__ import annotations

import json

from PIL import Image
from tests.unit.helpers import load_tiny, rgb_array

from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.models.generation import generate_batch
from triton_vlm.sampling import SamplingParams
from triton_vlm.structured import ResponseFormat

# The unit test's schema (tests/unit/test_structured.py), checked by hand: the GPU host has no jsonschema.
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "ok": {"type": "boolean"}},
          "required": ["answer", "count", "ok"], "additionalProperties": False}
IMAGE = Image.fromarray(rgb_array(48, 40, seed=3))


def fmt() -> ResponseFormat:
    parsed = ResponseFormat.parse(json.dumps({"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}))
    assert parsed is not None
    return parsed


def check(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"answer", "count", "ok"} and value["answer"] in ("yes", "no"), value
    assert type(value["count"]) is int and 0 <= value["count"] <= 9 and type(value["ok"]) is bool, value


def test_the_graphed_engine_answers_json_that_matches_the_schema() -> None:
    family, model, processor = load_tiny("llava", "cuda", None)
    params = [SamplingParams(max_tokens=60, response_format=fmt()),
              SamplingParams(max_tokens=60, temperature=1.0, seed=7, response_format=fmt()),
              SamplingParams(max_tokens=8)]
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=256, max_num_seqs=2))
    assert engine.runner.use_graphs
    results = engine.generate([(IMAGE, "Describe it.", p) for p in params])
    for ids in results[:2]:
        check(family.decode_text(processor, ids))
    assert engine.runner._graphs, "decode steps replayed CUDA graphs"  # noqa: SLF001 (what the test is about)
    batched = generate_batch(family, model, processor, [IMAGE] * 3, ["Describe it."] * 3, params)
    assert results == [list(o.token_ids) for o in batched]
