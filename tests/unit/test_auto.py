"""The ``auto`` family (any AutoModelForImageTextToText with a chat template) and ``triton-vlm add-model``.

The shared generation tests (test_generation.py, through the ``runtime`` fixture) run the auto family too, on the
tiny Idefics3 of an `add-model` SmolVLM (the checkpoint the smolvlm family serves on the engine): greedy ==
transformers' generate, batch == singles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from triton_vlm._protocol.model_config import load_model_config
from triton_vlm.chat import Chat, Message
from triton_vlm.cli.main import main
from triton_vlm.config import read_config_file, read_settings
from triton_vlm.errors import InvalidInputError, ModelLoadError, UnknownModelError
from triton_vlm.launcher.repository import public_config
from triton_vlm.launcher.scaffold import add_model, render_config, render_model_py
from triton_vlm.models import get_family
from triton_vlm.models.auto.family import AutoFamily
from triton_vlm.models.base import reserved_tokens
from triton_vlm.models.generation import generate_batch
from triton_vlm.runtime import VLMRuntime
from triton_vlm.sampling import SamplingParams

from .helpers import REPOSITORY, SAMPLE_IMAGE, rgb_array

SMOLVLM = "HuggingFaceTB/SmolVLM-256M-Instruct"


# -- add-model -----------------------------------------------------------------------------------------------------
def test_add_model_writes_a_few_lines_with_family_and_hub_id(tmp_path: Path) -> None:
    target = add_model(tmp_path, "qwen-vl.test_2", "Qwen/Qwen2-VL-2B-Instruct")
    assert target == tmp_path / "qwen-vl.test_2"
    text = (target / "config.pbtxt").read_text()
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        'name: "qwen-vl.test_2"', 'backend: "python"',
        'parameters { key: "model_family" value: { string_value: "auto" } }',
        'parameters { key: "hf_model_id" value: { string_value: "Qwen/Qwen2-VL-2B-Instruct" } }']
    assert "TRITON_VLM_QWEN_VL_TEST_2_<KEY>" in text and "src/triton_vlm/config/schema.py" in text
    settings = read_settings(*read_config_file(target / "config.pbtxt"), env={})
    assert (settings.family, settings.weights.hf_model_id, settings.weights.revision) == (
        "auto", "Qwen/Qwen2-VL-2B-Instruct", "main")
    # A revision other than the default is written; the default is not.
    assert 'string_value: "v2"' in render_config("m", "auto", "a/b", "v2") and "revision" not in text
    source = (target / "1" / "model.py").read_text()
    assert 'family = "auto"' in source and "TritonVLMModel" in source
    compile(source, "model.py", "exec")


@pytest.mark.parametrize("model, family", [("llava", "llava"), ("kosmos2", "kosmos2"), ("moondream2", "moondream2"),
                                           ("smolvlm", "smolvlm")])
def test_add_model_serves_what_every_shipped_model_spells_out(tmp_path: Path, model: str, family: str) -> None:
    """The few lines add-model writes, completed at launch, are the shipped config: the same inputs (task for
    moondream2), outputs (entities for kosmos2), batching, instance and parameters."""
    existing = load_model_config(REPOSITORY / model / "config.pbtxt")
    revision = existing.parameters["revision"].string_value if "revision" in existing.parameters else "main"
    add_model(tmp_path, model, existing.parameters["hf_model_id"].string_value, family=family, revision=revision)
    assert public_config(tmp_path, model) == existing
    assert (tmp_path / model / "1" / "model.py").read_text() == (REPOSITORY / model / "1" / "model.py").read_text()
    assert render_model_py(family) == (REPOSITORY / model / "1" / "model.py").read_text()


def test_add_model_refusals(tmp_path: Path) -> None:
    add_model(tmp_path, "m", "a/b")
    with pytest.raises(InvalidInputError, match="already exists.*--force"):
        add_model(tmp_path, "m", "a/c")
    add_model(tmp_path, "m", "a/c", force=True)
    assert read_config_file(tmp_path / "m" / "config.pbtxt")[1]["hf_model_id"] == "a/c"
    for bad in ("", "a b", "../x", "x/y", "-x", "m_stream"):
        with pytest.raises(InvalidInputError, match="model name"):
            add_model(tmp_path, bad, "a/b")
    with pytest.raises(UnknownModelError, match="known families: auto"):
        add_model(tmp_path, "n", "a/b", family="blip2")
    with pytest.raises(InvalidInputError, match="hf_model_id"):
        add_model(tmp_path, "n", 'a"b')
    assert not (tmp_path / "n").exists()


def test_add_model_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["add-model", "tiny-vlm", "--hf-model-id", SMOLVLM, "--model-repository", str(tmp_path)])
    assert code == 0
    assert "./triton_start.sh --models tiny-vlm" in capsys.readouterr().out
    assert read_config_file(tmp_path / "tiny-vlm" / "config.pbtxt")[1]["model_family"] == "auto"
    code = main(["add-model", "tiny-vlm", "--hf-model-id", SMOLVLM, "--model-repository", str(tmp_path)])
    assert code == 1 and "already exists" in capsys.readouterr().err


# -- the adapter -------------------------------------------------------------------------------------------------
def test_auto_renders_the_chat_template(auto_runtime: VLMRuntime) -> None:
    loaded = auto_runtime.ensure_loaded()
    assert loaded.model.config.model_type == "idefics3"
    prompt = loaded.family.render_prompt(loaded.processor, "What is this?")
    assert prompt == "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"


def test_auto_refuses_reserved_tokens_in_prompts(auto_runtime: VLMRuntime) -> None:
    loaded = auto_runtime.ensure_loaded()
    reserved = reserved_tokens(loaded.processor)
    assert {"<image>", "<end_of_utterance>", "<fake_token_around_image>", "<s>"} <= set(reserved)
    for token in ("<image>", "<end_of_utterance>"):
        with pytest.raises(InvalidInputError, match="prompt: may not contain the reserved token") as refused:
            loaded.family.render_input(loaded.processor, f"hi {token}")
        assert refused.value.param == "prompt"
        # A chat's texts, earlier turns included, are refused naming messages.
        chat = Chat((Message("user", (f"hi {token}",)), Message("assistant", ("ok",)), Message("user", ("and?",))))
        with pytest.raises(InvalidInputError, match="reserved token") as refused:
            loaded.family.render_input(loaded.processor, chat)
        assert refused.value.param == "messages"
    # Through the runtime, a bad prompt fails alone in its batch.
    good = auto_runtime.make_request(SAMPLE_IMAGE.read_bytes(), "What?", max_tokens=2)
    bad = auto_runtime.make_request(SAMPLE_IMAGE.read_bytes(), "x <image> y", max_tokens=2)
    results = auto_runtime.generate([good, bad])
    assert not isinstance(results[0], Exception)
    assert isinstance(results[1], InvalidInputError)


def test_auto_refuses_models_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton_vlm.models.base import ModelFamily

    family = AutoFamily()

    def loads(model_type: str, chat_template: str | None) -> Any:
        model = type("M", (), {"config": type("C", (), {"model_type": model_type})()})()
        processor = type("P", (), {"chat_template": chat_template})()
        monkeypatch.setattr(ModelFamily, "load", lambda self, *a, **k: (model, processor))
        return family.load("x/y", revision=None, dtype=torch.float32, device=torch.device("cpu"),
                           local_files_only=True, trust_remote_code=False)

    assert loads("idefics3", "{{ x }}")
    with pytest.raises(ModelLoadError, match="no chat template"):
        loads("idefics3", None)
    with pytest.raises(ModelLoadError, match="mllama.*cross-attention"):
        loads("mllama", "{{ x }}")


def test_tiny_variant_is_picked_by_architecture() -> None:
    family = get_family("auto")
    assert family.tiny_variant(SMOLVLM) == "idefics3"
    assert family.tiny_variant("someone/idefics3-8b") == "idefics3"
    assert family.tiny_variant("org/unknown-vlm") == "idefics3"  # the default stand-in
    assert get_family("llava").tiny_variant("llava-hf/llava-1.5-7b-hf") is None
    with pytest.raises(ValueError, match="no tiny build for model type 'nope'"):
        family.build_tiny(Path("/nonexistent"), variant="nope")


def test_auto_positions_count_from_zero_over_real_tokens(auto_runtime: VLMRuntime) -> None:
    loaded = auto_runtime.ensure_loaded()
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    positions = loaded.family.position_ids(loaded.model, {"attention_mask": mask})
    assert positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


# -- multimodal RoPE (Qwen2-VL), in process ----------------------------------------------------------------------
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_qwen2_vl() -> tuple[Any, Any]:
    """A tiny random Qwen2-VL (3-D multimodal RoPE) with its real processor, built in memory.

    transformers 5.x checks Qwen2-VL's video processor class on construction, and that class needs
    torchvision, which this project does not install: the check is skipped here (images only)."""
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    from triton_vlm.tiny import seeded, train_byte_level_bpe

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_byte_level_bpe(500, specials, ["user assistant"]),
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=8 * 8 * 4, max_pixels=32 * 32 * 4, patch_size=8,
                                               merge_size=2, temporal_patch_size=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, *a, **k: None)
        processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=QWEN_TEMPLATE)
    processor.tokenizer.padding_side = "left"
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    seeded()
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


QWEN_IMAGES = [(64, 48), (20, 50), (32, 32)]
QWEN_PROMPTS = ["What is this?", "a photo of a cat sitting on a red mat. Describe it in detail.", "hi"]


def test_mrope_positions_are_three_dimensional(tiny_qwen2_vl: tuple[Any, Any]) -> None:
    model, processor = tiny_qwen2_vl
    family = AutoFamily()
    image = Image.fromarray(rgb_array(64, 48))
    inputs = family.encode(processor, [image], [family.render_prompt(processor, "What is this?")])
    positions = family.position_ids(model, dict(inputs))
    length = inputs["input_ids"].shape[1]
    assert positions.shape == (3, 1, length)
    assert not torch.equal(positions[1], positions[2])  # image tokens: height and width differ
    assert positions[:, 0, -1].unique().numel() == 1  # the prompt ends with text: all three agree
    assert int(positions.max()) < length - 1  # an image's tokens share positions


def test_mrope_logits_equal_the_models_own_positions(tiny_qwen2_vl: tuple[Any, Any]) -> None:
    """Prefill and a decode step with our explicit positions give the logits of the model's own forward (which
    computes its 3-D positions itself); 1-D positions would not (so the check has teeth)."""
    from transformers import DynamicCache

    from triton_vlm.models.base import ModelFamily

    model, processor = tiny_qwen2_vl
    family = AutoFamily()
    image = Image.fromarray(rgb_array(64, 48, seed=3))
    inputs = dict(family.encode(processor, [image], [family.render_prompt(processor, "What is this?")]))
    with torch.inference_mode():
        positions = family.position_ids(model, inputs)
        cache = DynamicCache()
        prefill = family.prefill(model, inputs, positions, cache)
        token = prefill.argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=-1)
        step = family.decode(model, token, mask, positions[..., -1:] + 1, cache)
        whole = dict(inputs, input_ids=torch.cat([inputs["input_ids"], token], dim=-1), attention_mask=mask,
                     mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(token)], dim=-1))
        reference = model(**whole).logits
        flat = family.prefill(model, inputs, ModelFamily.position_ids(family, model, inputs), DynamicCache())
    torch.testing.assert_close(prefill, reference[:, -2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step, reference[:, -1], rtol=1e-4, atol=1e-4)
    assert (flat - reference[:, -2]).abs().max() > 1e-3


def test_mrope_greedy_equals_transformers_generate(tiny_qwen2_vl: tuple[Any, Any]) -> None:
    model, processor = tiny_qwen2_vl
    family = AutoFamily()
    for (w, h), prompt in zip(QWEN_IMAGES[:2], QWEN_PROMPTS[:2], strict=True):
        image = Image.fromarray(rgb_array(w, h, seed=w))
        (ours,) = generate_batch(family, model, processor, [image], [prompt], [SamplingParams(max_tokens=10)])
        inputs = family.encode(processor, [image], [family.render_prompt(processor, prompt)])
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=10)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        eos = processor.tokenizer.eos_token_id
        expected = expected[:expected.index(eos)] if eos in expected else expected
        assert list(ours.token_ids) == expected


def test_mrope_batch_equals_single_requests(tiny_qwen2_vl: tuple[Any, Any]) -> None:
    model, processor = tiny_qwen2_vl
    family = AutoFamily()
    images = [Image.fromarray(rgb_array(w, h, seed=i)) for i, (w, h) in enumerate(QWEN_IMAGES)]
    params = [SamplingParams(max_tokens=8)] * 3
    batch = generate_batch(family, model, processor, images, QWEN_PROMPTS, params)
    singles = [generate_batch(family, model, processor, [i], [p], [q])[0]
               for i, p, q in zip(images, QWEN_PROMPTS, params, strict=True)]
    assert len({s.prompt_tokens for s in singles}) == 3  # padded batch
    assert batch == singles


def test_make_tiny_builds_the_auto_stand_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-tiny", "--families", "auto,auto:idefics3", "--output", str(tmp_path)]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 2 and paths[0] == paths[1]  # the default stand-in is the idefics3 one
    assert Path(paths[0]).name.startswith("auto-idefics3-v") and (Path(paths[0]) / "config.json").is_file()
