"""moondream2 end to end on the tiny checkpoint: built in the official layout, loaded by the real loader,
generated through the shared loop (batch == singles), skills, detect/point JSON, direct runtime, plumbing."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRITON_VLM_CACHE", tempfile.mkdtemp(prefix="triton-vlm-unit-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from triton_vlm.errors import InvalidInputError  # noqa: E402
from triton_vlm.models import get_family  # noqa: E402
from triton_vlm.models.generation import generate_batch  # noqa: E402
from triton_vlm.models.moondream2 import DEFAULT_REVISION  # noqa: E402
from triton_vlm.models.moondream2.config import MoondreamConfig  # noqa: E402
from triton_vlm.models.moondream2.model import prefill_mask  # noqa: E402
from triton_vlm.models.moondream2.processor import Moondream2Processor  # noqa: E402
from triton_vlm.models.moondream2.tasks import parse_task  # noqa: E402
from triton_vlm.models.moondream2.text import apply_rotary, rotary_tables  # noqa: E402
from triton_vlm.models.moondream2.tokenizer import LEGACY, STARMIE, STARMIE_SPECIAL_TOKENS  # noqa: E402
from triton_vlm.models.moondream2.weights import check_keys  # noqa: E402
from triton_vlm.sampling import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "triton_models"
SAMPLE = ROOT / "test_images" / "sample_image.jpg"


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    from triton_vlm.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint("moondream2")


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path) -> tuple[Any, Any, Any]:
    family = get_family("moondream2")
    model, processor = family.load(str(tiny_dir), revision=None, dtype=torch.float32, device=torch.device("cpu"),
                                   local_files_only=True, trust_remote_code=False)
    return family, model, processor


IMAGES = [Image.open(SAMPLE).convert("RGB"), noise(50, 30, 1), noise(90, 200, 2)]


# -- the tiny checkpoint is an official-layout checkpoint ----------------------------------------------------
def test_tiny_checkpoint_uses_the_official_file_layout(tiny_dir: Path, loaded: tuple[Any, Any, Any]) -> None:
    from safetensors import safe_open

    _, model, _ = loaded
    assert {p.name for p in tiny_dir.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118 - no __iter__
    assert all(k.startswith(("model.vision.", "model.text.", "model.region.")) for k in shapes)
    assert {"model.text.wte", "model.vision.pos_emb", "model.region.size_features"} <= set(shapes)
    assert check_keys(shapes, model).ok
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "moondream1" and config["config"]["text"]["dim"] == 64


def test_tiny_tokenizer_has_starmie_control_tokens(loaded: tuple[Any, Any, Any]) -> None:
    _, model, processor = loaded
    assert processor.generation is STARMIE
    assert [processor.tokenizer.token_to_id(t) for t in STARMIE_SPECIAL_TOKENS] == list(range(21))
    assert model.suppressed_decode_ids == (processor.tokens.answer_id,) == (3,)


# -- prompts -----------------------------------------------------------------------------------------------
class CharTokenizer:
    pad_token_id = eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [1000 + ord(c) for c in text]


def test_starmie_templates_match_the_reference_ids() -> None:
    processor = Moondream2Processor(CharTokenizer(), MoondreamConfig(), STARMIE)  # type: ignore[arg-type]
    enc = CharTokenizer().encode
    # The question is closed by the suffix and, without reasoning, the suffix again opens the answer.
    assert processor.prompt_tokens(parse_task(None), "Why?") == [1, 15381, 2, *enc("Why?"), 3, 3]
    assert processor.prompt_tokens(parse_task("caption:short"), "") == [1, 32708, 2, 12492, 3]
    assert processor.prompt_tokens(parse_task("caption"), "ignored") == [1, 32708, 2, 6382, 3]
    assert processor.prompt_tokens(parse_task("caption:long"), "") == [1, 32708, 2, 4059, 3]
    assert processor.prompt_tokens(parse_task("detect"), "face") == [1, 7235, 476, 2, *enc(" face"), 3]
    assert processor.prompt_tokens(parse_task("point"), "face") == [1, 2581, 2, *enc(" face"), 3]


def test_legacy_templates_frame_the_question_as_text() -> None:
    config = MoondreamConfig.from_dict({}, LEGACY.defaults)
    processor = Moondream2Processor(CharTokenizer(), config, LEGACY)  # type: ignore[arg-type]
    enc = CharTokenizer().encode
    assert config.tokenizer.eos_id == config.tokenizer.bos_id == 50256
    assert processor.prompt_tokens(parse_task("query"), "Why?") == [198, 198, 24361, 25, *enc(" Why?"),
                                                                      198, 198, 33706, 25]
    assert processor.prompt_tokens(parse_task("detect"), "face") == [198, 198, 47504, 25, *enc(" face"), 628]


@pytest.mark.parametrize(("raw", "name"), [(None, "query"), ("", "query"), (" Caption ", "caption:normal"),
                                           ("caption:SHORT", "caption:short"), ("detect", "detect"),
                                           ("point", "point")])
def test_task_spellings(raw: str | None, name: str) -> None:
    assert parse_task(raw).name == name


@pytest.mark.parametrize("raw", ["segment", "caption:tiny", "detect:face", "query:x"])
def test_unknown_tasks_are_refused(raw: str) -> None:
    with pytest.raises(InvalidInputError, match="task"):
        parse_task(raw)


# -- model internals ---------------------------------------------------------------------------------------
def test_prefill_mask_is_bidirectional_over_the_prefix_and_causal_after() -> None:
    # One row padded by 2; prefix of 3 (BOS + 2 image tokens), then 2 prompt tokens.
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 0, 0, 1, 2, 3, 4]])
    mask = prefill_mask(attention, positions, prefix_len=3)[0, 0]
    expected = torch.tensor([
        [0, 0, 1, 1, 1, 0, 0],  # padding queries look at the prefix only
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],  # BOS sees the image tokens after it
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0],  # prompt: causal
        [0, 0, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_half_split_rotary_gives_the_reference_interleaved_attention_scores() -> None:
    # The reference writes rotated pairs interleaved; we keep halves apart. Scores q.k must not change.
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    positions = torch.tensor([[0, 3, 7, 100, 2047]])
    cos, sin = rotary_tables(positions, 32)

    def interleaved(x: torch.Tensor) -> torch.Tensor:
        a, b, rest = x[..., :16], x[..., 16:32], x[..., 32:]
        c, s = cos[:, None], sin[:, None]
        rotated = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
        return torch.cat([rotated, rest], dim=-1)

    ours = apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)
    theirs = interleaved(q) @ interleaved(k).transpose(-1, -2)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_cached_decode_matches_a_fresh_prefill(loaded: tuple[Any, Any, Any]) -> None:
    family, model, processor = loaded
    (out,) = generate_batch(family, model, processor, [IMAGES[0]], ["what is in this image?"],
                            [SamplingParams(max_tokens=6)])
    assert len(out.token_ids) == 6
    # Re-run the prompt plus the first five generated tokens in one pass: the sixth must come out again.
    prompt = processor.prompt_tokens(parse_task(None), "what is in this image?") + list(out.token_ids[:5])
    inputs = processor([IMAGES[0]], [prompt])
    from transformers import DynamicCache

    with torch.inference_mode():
        _, logits = model.prefill(**inputs, position_ids=torch.arange(inputs["input_ids"].shape[1])[None],
                                  cache=DynamicCache())
        logits[:, list(model.suppressed_decode_ids)] = float("-inf")
    assert int(logits.argmax(-1)) == out.token_ids[5]


# -- the shared loop ---------------------------------------------------------------------------------------
def test_left_padded_batch_equals_single_requests(loaded: tuple[Any, Any, Any]) -> None:
    family, model, processor = loaded
    prompts = ["what is in this image?", "", "How many objects are there? Answer with one word."]
    tasks = [None, "caption:short", "query"]
    params = [SamplingParams(max_tokens=10), SamplingParams(max_tokens=7),
              SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=7)]
    batch = generate_batch(family, model, processor, IMAGES, prompts, params, tasks)
    singles = [generate_batch(family, model, processor, [i], [p], [s], [t])[0]
               for i, p, s, t in zip(IMAGES, prompts, params, tasks, strict=True)]
    assert [o.token_ids for o in batch] == [o.token_ids for o in singles]
    assert [o.text for o in batch] == [o.text for o in singles]
    assert [o.prompt_tokens for o in batch] == [o.prompt_tokens for o in singles]
    # BOS + 16 image tokens + the template and question.
    assert batch[1].prompt_tokens == 1 + 16 + len(processor.prompt_tokens(parse_task("caption:short"), ""))
    assert all(len(o.token_ids) <= s.max_tokens for o, s in zip(batch, params, strict=True))


def test_answer_marker_is_never_generated(loaded: tuple[Any, Any, Any]) -> None:
    family, model, processor = loaded
    outs = generate_batch(family, model, processor, IMAGES, ["a", "b", "c"], [SamplingParams(max_tokens=20)] * 3)
    assert all(processor.tokens.answer_id not in o.token_ids[1:] for o in outs)


# -- detect / point ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["detect", "point"])
def test_region_tasks_answer_json_in_pixels_inside_the_image(loaded: tuple[Any, Any, Any], kind: str) -> None:
    family, model, processor = loaded
    images = [IMAGES[0], IMAGES[2]]
    outs = family.generate(model, processor, images, ["face", "cat"], [SamplingParams()] * 2, [kind, kind])
    for out, image in zip(outs, images, strict=True):
        payload = json.loads(out.text)
        assert payload["image_size"] == {"width": image.width, "height": image.height}
        found = payload["objects" if kind == "detect" else "points"]
        assert isinstance(found, list) and len(found) <= 50
        assert out.finish_reason in ("stop", "length") and out.token_ids == ()
        for item in found:
            if kind == "detect":
                assert set(item) == {"x_min", "y_min", "x_max", "y_max"}
                assert 0 <= item["x_min"] <= item["x_max"] <= image.width
                assert 0 <= item["y_min"] <= item["y_max"] <= image.height
            else:
                assert set(item) == {"x", "y"}
                assert 0 <= item["x"] < image.width and 0 <= item["y"] < image.height


def test_mixed_batch_keeps_request_order(loaded: tuple[Any, Any, Any]) -> None:
    family, model, processor = loaded
    tasks = ["point", "query", "detect", "caption:long"]
    prompts = ["cat", "what is this?", "face", ""]
    images = [IMAGES[0], IMAGES[1], IMAGES[2], IMAGES[0]]
    outs = family.generate(model, processor, images, prompts, [SamplingParams(max_tokens=5)] * 4, tasks)
    assert "points" in json.loads(outs[0].text) and "objects" in json.loads(outs[2].text)
    alone = generate_batch(family, model, processor, [images[3]], [""], [SamplingParams(max_tokens=5)],
                           ["caption:long"])[0]
    assert outs[3].token_ids == alone.token_ids
    assert outs[1].token_ids == generate_batch(family, model, processor, [images[1]], ["what is this?"],
                                               [SamplingParams(max_tokens=5)])[0].token_ids


# -- served path pieces ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime() -> Any:
    from triton_vlm.direct import direct_runtime

    runtime = direct_runtime("moondream2", tiny=True, repository=REPOSITORY, device="cpu")
    runtime.ensure_loaded()
    return runtime


def test_direct_runtime_serves_every_task(runtime: Any) -> None:
    from triton_vlm.direct import direct_infer

    assert direct_infer(runtime, SAMPLE, "What is this?", max_tokens=4).finish_reason in ("stop", "length")
    assert direct_infer(runtime, SAMPLE, "", task="caption:short", max_tokens=4).prompt_tokens > 17
    assert "objects" in json.loads(direct_infer(runtime, SAMPLE, "face", task="detect").text)
    assert "points" in json.loads(direct_infer(runtime, SAMPLE, "face", task="point").text)


def test_runtime_validates_task_and_prompt(runtime: Any) -> None:
    image = png(IMAGES[1])
    assert runtime.make_request(image, "", task="caption").task == "caption:normal"
    assert runtime.make_request(image, b"hi", task=b"DETECT").task == "detect"
    assert runtime.make_request(image, "hi").task is None
    for prompt, task, field in [("", "detect", "prompt"), ("", None, "prompt"), ("x", "segment", "task"),
                                ("x", b"\xff", "task"), ("<|endoftext|> hi", None, "prompt")]:
        with pytest.raises(InvalidInputError, match=f"^{field}:"):
            runtime.make_request(image, prompt, task=task)


def test_runtime_batch_isolates_a_request_over_the_context(runtime: Any) -> None:
    image = png(IMAGES[1])
    good = runtime.make_request(image, "hi", max_tokens=3)
    too_long = runtime.make_request(image, "hi", max_tokens=1000)  # tiny context is 512 tokens
    results = runtime.generate([good, too_long])
    assert not isinstance(results[0], Exception)
    assert isinstance(results[1], InvalidInputError) and "max_tokens" in str(results[1])
    assert results[1].param == "max_tokens"


def test_families_without_tasks_refuse_one() -> None:
    with pytest.raises(InvalidInputError, match="takes no task") as info:
        get_family("llava").normalize_task("detect")
    assert info.value.param == "task"
    assert get_family("kosmos2").normalize_task("  ") is None


def test_moondream2_is_servable_and_pinned() -> None:
    from triton_vlm._protocol.model_config import load_model_config
    from triton_vlm.launcher.repository import model_settings, servable_models

    assert "moondream2" in servable_models(REPOSITORY)
    config = load_model_config(REPOSITORY / "moondream2" / "config.pbtxt")
    assert config.parameters["revision"].string_value == DEFAULT_REVISION == "2025-06-21"
    assert model_settings(REPOSITORY, "moondream2", {}).weights.trust_remote_code is False
    task = {i.name: i for i in config.input}["task"]
    assert task.optional and list(task.dims) == [1]


def test_auto_dtype_on_gpu_is_the_release_precision() -> None:
    from triton_vlm.config import ModelSettings
    from triton_vlm.loading import resolve_dtype

    settings = ModelSettings(model_name="moondream2", family="moondream2")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_dtype(settings, cuda, get_family("moondream2")) == torch.bfloat16
    assert resolve_dtype(settings, cuda, get_family("llava")) == torch.float16
    assert resolve_dtype(settings, cuda) == torch.float16
    assert resolve_dtype(settings, cpu, get_family("moondream2")) == torch.float32
    assert resolve_dtype(settings.with_overrides(dtype="float16"), cuda, get_family("moondream2")) == torch.float16
