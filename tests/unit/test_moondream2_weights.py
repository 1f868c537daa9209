"""moondream2 weights: the official key layout is fully covered, loading is strict, missing weights fail clearly."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRITON_VLM_CACHE", tempfile.mkdtemp(prefix="triton-vlm-unit-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from triton_vlm.errors import ModelLoadError  # noqa: E402
from triton_vlm.models.moondream2.config import MoondreamConfig  # noqa: E402
from triton_vlm.models.moondream2.model import Moondream2Model  # noqa: E402
from triton_vlm.models.moondream2.tokenizer import LEGACY, STARMIE, detect_generation  # noqa: E402
from triton_vlm.models.moondream2.weights import (  # noqa: E402
    KEY_TABLE,
    check_keys,
    load_official_state_dict,
    resolve_checkpoint,
    to_official,
    to_ours,
)


def official_layout(config: MoondreamConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an official checkpoint, written out from the reference's module structure
    (``build_vision_model`` / ``build_text_model`` / the region ``ModuleDict`` under ``HfMoondream.model``)
    independently of :data:`KEY_TABLE`."""
    v, t, r = config.vision, config.text, config.region
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, fan_in: int, fan_out: int) -> None:
        shapes[f"model.{name}.weight"] = (fan_out, fan_in)
        shapes[f"model.{name}.bias"] = (fan_out,)

    def layer_norm(name: str, dim: int) -> None:
        shapes[f"model.{name}.weight"] = (dim,)
        shapes[f"model.{name}.bias"] = (dim,)

    linear("vision.patch_emb", v.enc_patch_size ** 2 * v.in_channels, v.enc_dim)
    shapes["model.vision.pos_emb"] = (1, (v.crop_size // v.enc_patch_size) ** 2, v.enc_dim)
    for i in range(v.enc_n_layers):
        block = f"vision.blocks.{i}"
        layer_norm(f"{block}.ln1", v.enc_dim)
        linear(f"{block}.attn.qkv", v.enc_dim, 3 * v.enc_dim)
        linear(f"{block}.attn.proj", v.enc_dim, v.enc_dim)
        layer_norm(f"{block}.ln2", v.enc_dim)
        linear(f"{block}.mlp.fc1", v.enc_dim, v.enc_ff_dim)
        linear(f"{block}.mlp.fc2", v.enc_ff_dim, v.enc_dim)
    layer_norm("vision.post_ln", v.enc_dim)
    linear("vision.proj_mlp.fc1", 2 * v.enc_dim, v.proj_inner_dim)
    linear("vision.proj_mlp.fc2", v.proj_inner_dim, v.proj_out_dim)

    shapes["model.text.wte"] = (t.vocab_size, t.dim)
    qkv = int(t.dim * (1 + 2 * t.n_kv_heads / t.n_heads))
    for i in range(t.n_layers):
        block = f"text.blocks.{i}"
        layer_norm(f"{block}.ln", t.dim)
        linear(f"{block}.attn.qkv", t.dim, qkv)
        linear(f"{block}.attn.proj", t.dim, t.dim)
        linear(f"{block}.mlp.fc1", t.dim, t.ff_dim)
        linear(f"{block}.mlp.fc2", t.ff_dim, t.dim)
    layer_norm("text.post_ln", t.dim)
    linear("text.lm_head", t.dim, t.vocab_size)

    shapes["model.region.coord_features"] = (1, r.coord_feat_dim // 2)  # stored transposed: [1, n]
    linear("region.coord_encoder", r.coord_feat_dim, r.dim)
    linear("region.coord_decoder.fc1", r.dim, r.inner_dim)
    linear("region.coord_decoder.fc2", r.inner_dim, r.coord_out_dim)
    shapes["model.region.size_features"] = (2, r.size_feat_dim // 2)
    linear("region.size_encoder", r.size_feat_dim, r.dim)
    linear("region.size_decoder.fc1", r.dim, r.inner_dim)
    linear("region.size_decoder.fc2", r.inner_dim, r.size_out_dim)
    return shapes


@pytest.fixture(scope="module")
def real_meta_model() -> Moondream2Model:
    with torch.device("meta"):
        return Moondream2Model(MoondreamConfig())


def test_official_layout_of_the_real_config_matches_the_release() -> None:
    layout = official_layout(MoondreamConfig())
    # 592 tensors, 1,927,237,104 parameters: counted from the reference module built with its default config.
    assert len(layout) == 592
    assert sum(torch.Size(s).numel() for s in layout.values()) == 1_927_237_104


def test_key_table_covers_every_official_tensor_of_the_real_model(real_meta_model: Moondream2Model) -> None:
    report = check_keys(official_layout(MoondreamConfig()), real_meta_model)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []


def test_loading_the_full_official_layout_leaves_nothing_missing_or_unexpected() -> None:
    with torch.device("meta"):
        model = Moondream2Model(MoondreamConfig())
        tensors = {k: torch.empty(s) for k, s in official_layout(MoondreamConfig()).items()}
    load_official_state_dict(model, tensors, model_id="vikhyatk/moondream2")  # strict: raises on any gap
    assert {to_official(k) for k in model.state_dict()} == set(tensors)


def test_names_round_trip_and_the_prefix_is_optional(real_meta_model: Moondream2Model) -> None:
    for name in real_meta_model.state_dict():
        assert to_ours(to_official(name)) == name
        assert to_ours(to_official(name).removeprefix("model.")) == name
    assert to_ours("model.text.blocks.3.attn.proj.bias") == "text.layers.3.attn.out_proj.bias"
    assert to_ours("model.vision.blocks.0.attn.qkv.scale") is None
    assert len({ours for _, ours in KEY_TABLE}) == len(KEY_TABLE)


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape"])
def test_loading_is_strict_and_names_the_offending_key(defect: str) -> None:
    with torch.device("meta"):
        model = Moondream2Model(MoondreamConfig())
        tensors = {k: torch.empty(s) for k, s in official_layout(MoondreamConfig()).items()}
        if defect == "missing":
            del tensors["model.text.blocks.7.mlp.fc2.weight"]
            culprit = "text.layers.7.mlp.fc2.weight"
        elif defect == "unexpected":
            tensors["model.text.blocks.0.kv_cache.k_cache"] = torch.empty(1, 32, 2048, 64)
            culprit = "model.text.blocks.0.kv_cache.k_cache"
        else:
            tensors["model.vision.pos_emb"] = torch.empty(1, 730, 1152)
            culprit = "model.vision.pos_emb"
    with pytest.raises(ModelLoadError, match="vikhyatk/moondream2") as info:
        load_official_state_dict(model, tensors, model_id="vikhyatk/moondream2")
    assert culprit in str(info.value)


def test_quantized_checkpoints_are_refused() -> None:
    config = MoondreamConfig.from_dict({"text": {"group_size": 128}})
    with pytest.raises(ModelLoadError, match="int4"):
        Moondream2Model(config)


# -- tokenizer generation ---------------------------------------------------------------------------------
def test_tokenizer_generation_follows_the_checkpoint_code(tmp_path: Path) -> None:
    (tmp_path / "moondream.py").write_text('self.tokenizer = Tokenizer.from_pretrained("moondream/starmie-v1")')
    assert detect_generation(tmp_path) is STARMIE
    (tmp_path / "moondream.py").write_text(
        'self.tokenizer = Tokenizer.from_pretrained("vikhyatk/moondream2", revision="2025-01-09")')
    assert detect_generation(tmp_path, "2025-06-21") is LEGACY  # the code wins over the revision name


def test_tokenizer_generation_without_code_uses_the_tokenizer_then_the_revision(tmp_path: Path) -> None:
    assert detect_generation(tmp_path, "2025-04-14") is LEGACY
    assert detect_generation(tmp_path, "2025-06-21") is STARMIE
    assert detect_generation(tmp_path, "main") is STARMIE
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"content": "<|md_reserved_0|>"}]}))
    assert detect_generation(tmp_path, "2025-01-09") is STARMIE


# -- finding weights offline -------------------------------------------------------------------------------
@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_missing_weights_offline_name_the_model_and_how_to_provide_them(empty_hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_checkpoint("vikhyatk/moondream2", revision="2025-06-21", local_files_only=True)
    message = str(info.value)
    assert "vikhyatk/moondream2" in message and "2025-06-21" in message
    assert ("hf download vikhyatk/moondream2 config.json model.safetensors moondream.py --revision 2025-06-21"
            in message)
    assert "LOCAL_PATH" in message and "--tiny" in message


def test_missing_starmie_tokenizer_offline_names_it(empty_hub_cache: Path, tmp_path: Path) -> None:
    from triton_vlm.models import get_family
    from triton_vlm.tiny import ensure_tiny_checkpoint

    checkpoint = tmp_path / "md2"
    shutil.copytree(ensure_tiny_checkpoint("moondream2"), checkpoint)
    (checkpoint / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))  # the stale GPT-2 one
    (checkpoint / "moondream.py").write_text('Tokenizer.from_pretrained("moondream/starmie-v1")')
    with pytest.raises(ModelLoadError, match="moondream/starmie-v1") as info:
        get_family("moondream2").load(str(checkpoint), revision=None, dtype=torch.float32,
                                      device=torch.device("cpu"), local_files_only=True, trust_remote_code=False)
    assert "hf download moondream/starmie-v1 tokenizer.json" in str(info.value)


def _cache_repo(cache: Path, repo: str, revision: str, files: dict[str, Path]) -> None:
    """Lay ``files`` out as the Hugging Face cache does for ``repo@revision`` (refs -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def test_hub_id_and_pinned_revision_load_from_the_offline_cache(empty_hub_cache: Path) -> None:
    """The path real weights take: model id + revision -> cached snapshot, starmie tokenizer from its own repo."""
    from triton_vlm.models import get_family
    from triton_vlm.tiny import ensure_tiny_checkpoint

    tiny = ensure_tiny_checkpoint("moondream2")
    code = empty_hub_cache / "moondream.py"
    code.write_text('Tokenizer.from_pretrained("moondream/starmie-v1")')
    stale = empty_hub_cache / "stale-tokenizer.json"
    stale.write_text(json.dumps({"model": {"type": "BPE"}}))
    _cache_repo(empty_hub_cache, "vikhyatk/moondream2", "2025-06-21",
                {"config.json": tiny / "config.json", "model.safetensors": tiny / "model.safetensors",
                 "moondream.py": code, "tokenizer.json": stale})
    _cache_repo(empty_hub_cache, "moondream/starmie-v1", "main", {"tokenizer.json": tiny / "tokenizer.json"})
    model, processor = get_family("moondream2").load(
        "vikhyatk/moondream2", revision="2025-06-21", dtype=torch.float32, device=torch.device("cpu"),
        local_files_only=True, trust_remote_code=False)
    assert processor.generation is STARMIE
    assert processor.tokenizer.token_to_id("<|md_reserved_0|>") == 1
    assert model.suppressed_decode_ids == (3,)


def test_truncated_weights_are_a_load_error(tmp_path: Path) -> None:
    from triton_vlm.models import get_family
    from triton_vlm.tiny import ensure_tiny_checkpoint

    checkpoint = tmp_path / "md2"
    shutil.copytree(ensure_tiny_checkpoint("moondream2"), checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        get_family("moondream2").load(str(checkpoint), revision=None, dtype=torch.float32,
                                      device=torch.device("cpu"), local_files_only=True, trust_remote_code=False)


def test_tiny_builds_are_identical(tmp_path: Path) -> None:
    from triton_vlm.models import get_family

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        get_family("moondream2").build_tiny(tmp_path / name)
    for file in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
