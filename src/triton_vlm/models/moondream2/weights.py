"""Official moondream2 safetensors <-> our modules: the one key table, checkpoint lookup, loading and writing.

The official 2025 releases (``vikhyatk/moondream2``) hold one ``model.safetensors`` whose tensor names are the
reference module's (``model.vision.*``, ``model.text.*``, ``model.region.*``). :data:`KEY_TABLE` is the only
place those names are spelled; loading is strict both ways (a tensor we cannot place, or a parameter nothing
fills, is an error naming the keys).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from triton_vlm.errors import ModelLoadError
from triton_vlm.hub import hub_miss_reason

#: Files fetched from the Hub for a real checkpoint. moondream.py is read, never executed: it tells which
#: tokenizer generation the weights belong to; tokenizer.json is the tokenizer of the older generation.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "moondream.py",
                    "tokenizer.json")
OFFICIAL_PREFIX = "model."

# (official name, our name). "{i}" is a block index, "{p}" a Linear/LayerNorm "weight" or "bias".
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("vision.patch_emb.{p}", "vision.patch_embed.{p}"),
    ("vision.pos_emb", "vision.position_embedding"),
    ("vision.blocks.{i}.ln1.{p}", "vision.layers.{i}.norm1.{p}"),
    ("vision.blocks.{i}.attn.qkv.{p}", "vision.layers.{i}.attn.qkv.{p}"),
    ("vision.blocks.{i}.attn.proj.{p}", "vision.layers.{i}.attn.out_proj.{p}"),
    ("vision.blocks.{i}.ln2.{p}", "vision.layers.{i}.norm2.{p}"),
    ("vision.blocks.{i}.mlp.fc1.{p}", "vision.layers.{i}.mlp.fc1.{p}"),
    ("vision.blocks.{i}.mlp.fc2.{p}", "vision.layers.{i}.mlp.fc2.{p}"),
    ("vision.post_ln.{p}", "vision.post_norm.{p}"),
    ("vision.proj_mlp.fc1.{p}", "projector.mlp.fc1.{p}"),
    ("vision.proj_mlp.fc2.{p}", "projector.mlp.fc2.{p}"),
    ("text.wte", "text.embed_tokens.weight"),
    ("text.blocks.{i}.ln.{p}", "text.layers.{i}.norm.{p}"),
    ("text.blocks.{i}.attn.qkv.{p}", "text.layers.{i}.attn.qkv.{p}"),
    ("text.blocks.{i}.attn.proj.{p}", "text.layers.{i}.attn.out_proj.{p}"),
    ("text.blocks.{i}.mlp.fc1.{p}", "text.layers.{i}.mlp.fc1.{p}"),
    ("text.blocks.{i}.mlp.fc2.{p}", "text.layers.{i}.mlp.fc2.{p}"),
    ("text.post_ln.{p}", "text.final_norm.{p}"),
    ("text.lm_head.{p}", "text.lm_head.{p}"),
    ("region.coord_features", "region.coord_features"),
    ("region.coord_encoder.{p}", "region.coord_encoder.{p}"),
    ("region.coord_decoder.fc1.{p}", "region.coord_decoder.fc1.{p}"),
    ("region.coord_decoder.fc2.{p}", "region.coord_decoder.fc2.{p}"),
    ("region.size_features", "region.size_features"),
    ("region.size_encoder.{p}", "region.size_encoder.{p}"),
    ("region.size_decoder.fc1.{p}", "region.size_decoder.fc1.{p}"),
    ("region.size_decoder.fc2.{p}", "region.size_decoder.fc2.{p}"),
)


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(escaped + r"\Z")


_FORWARD = [(_pattern(official), ours) for official, ours in KEY_TABLE]
_BACKWARD = [(_pattern(ours), official) for official, ours in KEY_TABLE]


def _translate(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.match(key)
        if match:
            return target.format(**match.groupdict())
    return None


def to_ours(official_key: str) -> str | None:
    """Our parameter name for an official tensor name (with or without the ``model.`` prefix); None if unknown."""
    return _translate(official_key.removeprefix(OFFICIAL_PREFIX), _FORWARD)


def to_official(our_key: str) -> str:
    """The official tensor name (with the ``model.`` prefix) of one of our parameters."""
    official = _translate(our_key, _BACKWARD)
    if official is None:
        raise KeyError(f"no official moondream2 name for parameter {our_key!r}")
    return OFFICIAL_PREFIX + official


@dataclass(frozen=True)
class KeyReport:
    """How an official tensor set lines up with a model: empty lists mean a perfect match."""

    missing: list[str]  # our parameters nothing fills
    unexpected: list[str]  # official tensors with no place in our model
    mismatched: list[str]  # "name: official shape vs ours"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 8) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", self.mismatched)):
            if keys:
                more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{label}: {', '.join(keys[:limit])}{more}")
        return "; ".join(parts)


def check_keys(official_shapes: Mapping[str, tuple[int, ...]], model: torch.nn.Module) -> KeyReport:
    """Compare official tensor names and shapes with ``model``'s parameters, through :data:`KEY_TABLE`."""
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    filled: set[str] = set()
    unexpected, mismatched = [], []
    for key, shape in official_shapes.items():
        target = to_ours(key)
        if target is None or target not in ours:
            unexpected.append(key)
        elif tuple(shape) != ours[target]:
            mismatched.append(f"{key}: {tuple(shape)} vs {ours[target]}")
        else:
            filled.add(target)
    return KeyReport(sorted(set(ours) - filled), sorted(unexpected), mismatched)


def load_official_state_dict(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *,
                             model_id: str) -> None:
    """Put official ``tensors`` into ``model`` (assigning, so a model built on the meta device works)."""
    report = check_keys({k: tuple(v.shape) for k, v in tensors.items()}, model)
    if not report.ok:
        raise ModelLoadError(f"model {model_id!r}: the checkpoint does not match the moondream2 2025 layout "
                             f"({report.describe()})")
    # Every key has our name here (check_keys reported any that has none).
    ours = {name: v for k, v in tensors.items() if (name := to_ours(k)) is not None}
    model.load_state_dict(ours, strict=True, assign=True)


def read_official_tensors(checkpoint: Path, *, dtype: torch.dtype, device: torch.device,
                          model_id: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors file(s), converted to ``dtype`` on ``device``."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(checkpoint, model_id):
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has keys() but is not iterable
                    tensors[key] = handle.get_tensor(key).to(dtype)
        except Exception as exc:  # safetensors reports truncation and bad headers with its own error type
            raise ModelLoadError(f"model {model_id!r}: cannot read {str(path)!r} ({type(exc).__name__}: {exc}); "
                                 "download it again") from exc
    return tensors


def _safetensors_files(checkpoint: Path, model_id: str) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint / shard for shard in shards]
    single = checkpoint / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"model {model_id!r}: no model.safetensors in {str(checkpoint)!r}; moondream2 loads "
                         "safetensors weights only")


def read_checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    """The ``config`` section of ``config.json`` (empty in the official releases: all defaults)."""
    path = checkpoint / "config.json"
    if not path.is_file():
        return {}
    section = json.loads(path.read_text()).get("config") or {}
    return dict(section) if isinstance(section, dict) else {}


def resolve_checkpoint(source: str, *, revision: str | None, local_files_only: bool) -> Path:
    """A local directory holding the checkpoint: ``source`` itself, or a Hub snapshot of ``source@revision``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(source, revision=revision, allow_patterns=list(CHECKPOINT_FILES),
                                          local_files_only=local_files_only))
    except Exception as exc:
        raise ModelLoadError(_missing_message(source, revision, exc)) from exc
    if not (snapshot / "model.safetensors").is_file() and not (snapshot / "model.safetensors.index.json").is_file():
        raise ModelLoadError(_missing_message(source, revision,
                                              FileNotFoundError("model.safetensors not in the cached snapshot")))
    return snapshot


def _missing_message(model_id: str, revision: str | None, exc: Exception) -> str:
    pinned = f" --revision {revision}" if revision else ""
    return (
        f"model {model_id!r} (revision {revision or 'default'}): cannot load moondream2 weights: {hub_miss_reason()}. "
        f"Provide them by one of: (1) on a connected machine run `hf download {model_id} config.json "
        f"model.safetensors moondream.py{pinned}` and `hf download moondream/starmie-v1 tokenizer.json`, then copy "
        f"the Hugging Face cache to this host's HF_HOME; (2) set TRITON_VLM_MOONDREAM2_LOCAL_PATH (or the local_path parameter) to a "
        f"directory with config.json, model.safetensors and starmie's tokenizer.json; (3) use --tiny for test "
        f"weights. Cause: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    )


def official_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s parameters under their official names (what :func:`write_checkpoint` stores)."""
    for name, tensor in model.state_dict().items():
        yield to_official(name), tensor


def write_checkpoint(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Save ``model`` as an official-layout ``model.safetensors`` in directory ``path``."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to(dtype).contiguous() for name, t in official_tensors(model)}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
