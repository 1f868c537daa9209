"""triton_vlm.tiny: building, caching and loading the tiny random-weight checkpoints."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from triton_vlm.models import get_family
from triton_vlm.sampling import SamplingParams
from triton_vlm.tiny import (
    TINY_FORMAT_VERSION,
    ensure_tiny_checkpoint,
    tiny_checkpoint_dir,
    tiny_root,
    train_llama_style_vocab,
    train_unigram_vocab,
)

FAMILIES = ("llava", "kosmos2", "smolvlm", "llava_onevision")


class CountingBuild:
    def __init__(self, family: str, fail: bool = False) -> None:
        self.original = get_family(family).build_tiny
        self.calls = 0
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, path: Path, variant: str | None = None) -> None:
        with self.lock:
            self.calls += 1
        if self.fail:
            (path / "partial.bin").write_bytes(b"half")
            raise RuntimeError("build interrupted")
        self.original(path, variant)


def test_tiny_root_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_VLM_CACHE", str(tmp_path / "c"))
    assert tiny_root() == tmp_path / "c" / "tiny"
    monkeypatch.delenv("TRITON_VLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tiny_root() == tmp_path / "xdg" / "triton-vlm" / "tiny"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tiny_root() == Path.home() / ".cache" / "triton-vlm" / "tiny"


def test_checkpoint_dir_is_versioned(tmp_path: Path) -> None:
    assert tiny_checkpoint_dir("llava", tmp_path) == tmp_path / f"llava-v{TINY_FORMAT_VERSION}"


@pytest.mark.parametrize("family", FAMILIES)
def test_second_call_reuses_the_checkpoint(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_tiny_checkpoint(family)  # the session cache (built here or by a runtime fixture)
    weights = first / "model.safetensors"
    stamp = (weights.stat().st_mtime_ns, (first / "config.json").stat().st_mtime_ns)
    counting = CountingBuild(family)
    monkeypatch.setattr(get_family(family), "build_tiny", counting)
    assert ensure_tiny_checkpoint(family) == first
    assert counting.calls == 0
    assert (weights.stat().st_mtime_ns, (first / "config.json").stat().st_mtime_ns) == stamp


def test_build_writes_a_complete_checkpoint(tmp_path: Path) -> None:
    target = ensure_tiny_checkpoint("kosmos2", tmp_path)
    assert target == tiny_checkpoint_dir("kosmos2", tmp_path)
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert any(n.startswith("tokenizer") or n == "sentencepiece.bpe.model" for n in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".kosmos2-v") and p.is_dir()]


def test_concurrent_builders_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = CountingBuild("kosmos2")
    monkeypatch.setattr(get_family("kosmos2"), "build_tiny", counting)
    barrier = threading.Barrier(4)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(ensure_tiny_checkpoint("kosmos2", tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert counting.calls == 1
    assert results == [tiny_checkpoint_dir("kosmos2", tmp_path)] * 4
    assert (results[0] / "config.json").is_file() and (results[0] / "model.safetensors").is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_dir() and p != results[0]]
    assert leftovers == []  # no staging directories left behind


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_family("kosmos2"), "build_tiny", CountingBuild("kosmos2", fail=True))
    with pytest.raises(RuntimeError, match="build interrupted"):
        ensure_tiny_checkpoint("kosmos2", tmp_path)
    assert not tiny_checkpoint_dir("kosmos2", tmp_path).exists()
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []
    monkeypatch.undo()
    assert (ensure_tiny_checkpoint("kosmos2", tmp_path) / "config.json").is_file()  # a retry succeeds


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_are_deterministic(family: str, tmp_path: Path) -> None:
    session = ensure_tiny_checkpoint(family)
    other = ensure_tiny_checkpoint(family, tmp_path / "elsewhere")
    assert other != session
    assert (other / "model.safetensors").read_bytes() == (session / "model.safetensors").read_bytes()
    assert (other / "config.json").read_text() == (session / "config.json").read_text()


def test_moondream2_has_a_tiny_checkpoint_in_its_own_layout(tmp_path: Path) -> None:
    # Since the native moondream2 merge, moondream2 builds a tiny checkpoint too (the official file layout).
    target = ensure_tiny_checkpoint("moondream2", tmp_path)
    assert target == tiny_checkpoint_dir("moondream2", tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in target.iterdir()}


def test_tiny_llava_loads_with_the_real_classes() -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    path = ensure_tiny_checkpoint("llava")
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    assert isinstance(processor, LlavaProcessor)
    assert isinstance(LlavaProcessor.from_pretrained(path, local_files_only=True), LlavaProcessor)
    tokenizer = processor.tokenizer
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert processor.chat_template  # the LLaVA-1.5 "USER: <image>\n... ASSISTANT:" format
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_tiny_kosmos2_loads_with_the_real_classes() -> None:
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration, Kosmos2Processor

    path = ensure_tiny_checkpoint("kosmos2")
    model = Kosmos2ForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    assert isinstance(processor, Kosmos2Processor)
    assert isinstance(Kosmos2Processor.from_pretrained(path, local_files_only=True), Kosmos2Processor)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert "<grounding>" in processor.tokenizer.get_vocab()
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_tiny_llava_renders_the_llava_prompt(llava_runtime: Any) -> None:
    loaded = llava_runtime.ensure_loaded()
    assert loaded.family.render_prompt(loaded.processor, "What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"


def test_llama_style_vocab_is_deterministic() -> None:
    vocab, merges = train_llama_style_vocab(600)
    assert {"<unk>", "<s>", "</s>", "<0x0A>"} <= set(vocab) and merges
    assert all(train_llama_style_vocab(600) == (vocab, merges) for _ in range(3))


def test_unigram_vocab_has_specials_first() -> None:
    unigram = train_unigram_vocab(200, ["<s>", "<pad>", "</s>", "<unk>"])
    assert [t for t, _ in unigram[:4]] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert len(unigram) > 50


def test_unigram_vocab_is_deterministic() -> None:
    # tokenizers' UnigramTrainer orders pieces (and the filler scores of required characters) by hash-map
    # order and its scores vary in the last bits: train_unigram_vocab must still return the same list.
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    first = train_unigram_vocab(400, specials)
    assert all(train_unigram_vocab(400, specials) == first for _ in range(4))


def test_unigram_vocab_is_canonically_ordered() -> None:
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = train_unigram_vocab(400, specials)
    assert [t for t, _ in vocab[:4]] == specials
    pieces = vocab[4:]
    assert pieces == sorted(pieces, key=lambda item: (-item[1], item[0]))
    assert len({t for t, _ in pieces}) == len(pieces) and not set(specials) & {t for t, _ in pieces}
    assert all(round(score, 6) == score for _, score in pieces)


@pytest.mark.parametrize("family", [*FAMILIES, "moondream2"])
def test_two_fresh_builds_are_byte_identical(family: str, tmp_path: Path) -> None:
    first = ensure_tiny_checkpoint(family, tmp_path / "a")
    second = ensure_tiny_checkpoint(family, tmp_path / "b")
    assert first != second
    for name in ("tokenizer.json", "model.safetensors"):
        assert (first / name).is_file(), name
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_kosmos2_tokenizer_is_identical_across_builds(tmp_path: Path) -> None:
    session = (ensure_tiny_checkpoint("kosmos2") / "tokenizer.json").read_bytes()
    for root in ("a", "b"):
        assert (ensure_tiny_checkpoint("kosmos2", tmp_path / root) / "tokenizer.json").read_bytes() == session


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_files_are_identical_across_builds(family: str, tmp_path: Path) -> None:
    session = ensure_tiny_checkpoint(family)
    other = ensure_tiny_checkpoint(family, tmp_path)
    names = sorted(p.name for p in session.iterdir())
    assert names == sorted(p.name for p in other.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert (other / name).read_bytes() == (session / name).read_bytes(), name


def test_auto_tiny_checkpoint_is_per_architecture_and_reproducible(tmp_path: Path) -> None:
    first = ensure_tiny_checkpoint("auto", tmp_path / "a", variant="idefics3")
    assert first == tiny_checkpoint_dir("auto", tmp_path / "a", "idefics3")
    assert first.name == f"auto-idefics3-v{TINY_FORMAT_VERSION}"
    second = ensure_tiny_checkpoint("auto", tmp_path / "b", variant="idefics3")
    names = sorted(p.name for p in first.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(names)
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_full_size_random_checkpoints_exist_for_the_engine_families_only(tmp_path: Path) -> None:
    from triton_vlm.bench.checkpoints import save_random_full_size

    with pytest.raises(ValueError, match="no full-size random checkpoint for 'auto'"):
        save_random_full_size("auto", tmp_path, torch.device("cpu"))


def test_llava_geometry_is_llava_1_5s_processor_and_prompt_over_a_tiny_model(tmp_path: Path) -> None:
    """What ``bench/cpu_chat_run.sh`` serves: a checkpoint a server loads, whose processor gives a 640 x 480 image
    the 576 rows (and the prompt the tokens) llava-1.5-7b's does, over a model of well under a million parameters."""
    from PIL import Image

    from triton_vlm.bench.checkpoints import llava_7b_processor, save_random_full_size
    from triton_vlm.models import get_family

    save_random_full_size("llava_geometry", tmp_path, torch.device("cpu"))
    model, processor = get_family("llava").load(str(tmp_path), revision=None, dtype=torch.float32,
                                                device=torch.device("cpu"), local_files_only=True,
                                                trust_remote_code=False)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    text = ["USER: <image>\nWhat is in this image? ASSISTANT:"]
    image = [Image.new("RGB", (640, 480))]
    ours, real = (p(images=image, text=text, return_tensors="pt") for p in (processor, llava_7b_processor()))
    assert torch.equal(ours["input_ids"], real["input_ids"]) and int((ours["input_ids"] == 32000).sum()) == 576
    assert tuple(ours["pixel_values"].shape) == (1, 3, 336, 336)


def test_smolvlm_geometry_is_smolvlm_instructs_processor_over_a_tiny_model(tmp_path: Path) -> None:
    """A checkpoint a server loads whose processor takes a 336 px image to 1536 px and splits it into 16 tiles of 384
    px and the global view, 81 rows each (as SmolVLM-Instruct's), over a model of well under a million parameters:
    what the host's share of a SmolVLM request costs, measurable on a CPU."""
    from PIL import Image

    from triton_vlm.bench.checkpoints import save_random_full_size

    from .helpers import ParityCase

    save_random_full_size("smolvlm_geometry", tmp_path, torch.device("cpu"))
    family = get_family("smolvlm")
    model, processor = family.load(str(tmp_path), revision=None, dtype=torch.float32, device=torch.device("cpu"),
                                   local_files_only=True, trust_remote_code=False)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    text = family.render_input(processor, "What is shown?")
    out = processor(images=[Image.new("RGB", (336, 336))], text=[text], return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 17, 3, 384, 384)
    assert int((out["input_ids"] == model.config.image_token_id).sum()) == 17 * 81
    engine = ParityCase.engine((family, model, processor), max_model_len=2048)
    request = engine.prepare(Image.new("RGB", (336, 336)), "What is shown?", SamplingParams(max_tokens=2), None)
    assert len(request.mm_inputs["image_rows"]) == 17 * 81  # the engine takes it whole


def test_full_size_smolvlm_is_smolvlm_instruct_on_the_meta_device() -> None:
    """SmolVLM-Instruct's shapes (2.25B parameters as published; 81 image tokens per 384 px tile), built on the meta
    device: no memory, no weights."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from triton_vlm.models.smolvlm.family import image_seq_len, smolvlm_instruct_config, tiny_config

    tokenizer = AutoProcessor.from_pretrained(ensure_tiny_checkpoint("smolvlm")).tokenizer
    config = smolvlm_instruct_config(tokenizer)
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 2_246_272_880
    assert image_seq_len(config) == 81 and image_seq_len(tiny_config(tokenizer)) == 4
    assert model.lm_head.weight.shape == (49155, 2048) and len(tokenizer) < 49155
    assert model.model.connector.modality_projection.proj.weight.shape == (2048, 1152 * 9)


def test_the_full_size_llava_next_is_llava_v1_6_mistral_7b() -> None:
    """Built on the meta device (no memory): Mistral-7B's shapes without a sliding window (v0.2), CLIP-L/336, and a
    processor that tiles a 640 x 480 image on the 2 x 2 grid (base + 4 tiles) with the real ids for ``<image>``."""
    from PIL import Image
    from transformers import LlavaNextForConditionalGeneration

    from triton_vlm.bench.checkpoints import llava_next_7b_config, llava_next_7b_processor

    config = llava_next_7b_config()
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    assert 7.5e9 < sum(p.numel() for p in model.parameters()) < 7.6e9  # llava-v1.6-mistral-7b: 7.57 B
    assert (config.text_config.num_key_value_heads, config.text_config.sliding_window) == (8, None)
    processor = llava_next_7b_processor()
    encoded = processor(images=[Image.new("RGB", (640, 480))], text=["[INST] <image>\nhi [/INST]"],
                        return_tensors="pt")
    assert tuple(encoded["pixel_values"].shape) == (1, 5, 3, 336, 336)
    assert int((encoded["input_ids"] == config.image_token_id).sum()) == 2340
    assert processor.tokenizer.pad_token_id == 32001


def test_the_full_size_llava_onevision_is_llava_onevision_qwen2_7b_ov() -> None:
    """Built on the meta device (no memory): 8.03 B parameters as published (SigLIP so400m less its last layer,
    Qwen2-7B with q/k/v biases, no sliding window), and a processor that gives a 336 px image (the benchmark's) the
    1 x 1 grid (base + 1 tile of 729 features, 27 newlines) and a 640 x 480 one the 2 x 2 grid, unpadded."""
    from PIL import Image
    from transformers import LlavaOnevisionForConditionalGeneration

    from triton_vlm.bench.checkpoints import LLAVA_ONEVISION_VOCAB, llava_onevision_7b_sizes
    from triton_vlm.models.llava_onevision.family import random_config, random_processor

    sizes = llava_onevision_7b_sizes()
    processor = random_processor(sizes)
    config = random_config(sizes, processor.tokenizer, LLAVA_ONEVISION_VOCAB)
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 8_030_807_584
    assert model.model.language_model.layers[0].self_attn.q_proj.bias is not None
    assert set(config.text_config.layer_types) == {"full_attention"} and len(processor.tokenizer) < 152128
    prompt = ["<|im_start|>user <image>\nhi<|im_end|><|im_start|>assistant\n"]
    for size, tiles, rows in (((336, 336), 2, 729 + 27 * 28), ((640, 480), 5, 2929)):
        encoded = processor(images=[Image.new("RGB", size)], text=prompt, return_tensors="pt")
        assert tuple(encoded["pixel_values"].shape) == (1, tiles, 3, 384, 384)
        assert int((encoded["input_ids"] == config.image_token_id).sum()) == rows


def test_a_small_tokenizer_under_a_full_size_vocabulary_still_gets_ids_it_can_decode(tmp_path: Path) -> None:
    """The benchmarks' full-size checkpoints pair real vocabularies with tiny tokenizers: greedy random weights must
    pick ids the tokenizer has, or every piece of a streamed answer decodes to nothing and arrives at the end."""
    from triton_vlm.models.qwen2_vl.checkpoint import QWEN2_VL, TINY, train_tokenizer, write_random_checkpoint

    known = len(train_tokenizer())
    write_random_checkpoint(tmp_path, QWEN2_VL, TINY[QWEN2_VL], vocab_size=known + 20_000)
    model = get_family("qwen2_vl").load(str(tmp_path), revision=None, dtype=torch.float32,
                                        device=torch.device("cpu"), local_files_only=True,
                                        trust_remote_code=False)[0]
    assert model.get_output_embeddings().weight.shape[0] == known + 20_000
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), do_sample=False, max_new_tokens=24,
                             min_new_tokens=24)
    assert int(out[0, 4:].max()) < known
