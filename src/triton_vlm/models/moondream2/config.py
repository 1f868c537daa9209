"""moondream2 hyper-parameters: the values of the official 2025 checkpoints, and a tiny variant for tests.

Field names follow the ``config`` section of the official ``config.json`` (the reference implementation's
``MoondreamConfig.from_dict``), so a checkpoint that carries overrides there loads them unchanged. The official
releases leave that section empty, which means "the defaults below".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from triton_vlm.errors import ModelLoadError


@dataclass(frozen=True)
class VisionConfig:
    """The ViT that encodes 378x378 crops, and the MLP that projects its features into the text model."""

    enc_dim: int = 1152
    enc_patch_size: int = 14
    enc_n_layers: int = 27
    enc_ff_dim: int = 4304
    enc_n_heads: int = 16
    proj_out_dim: int = 2048
    crop_size: int = 378
    in_channels: int = 3
    max_crops: int = 12
    overlap_margin: int = 4  # in patches, on each side of a local crop
    proj_inner_dim: int = 8192

    @property
    def grid(self) -> int:
        """Patches per crop side (27 for the real model)."""
        return self.crop_size // self.enc_patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        return self.enc_patch_size * self.enc_patch_size * self.in_channels


@dataclass(frozen=True)
class TextConfig:
    """The Phi-style decoder: fused QKV, half-rotary heads, attention and MLP in parallel off one LayerNorm."""

    dim: int = 2048
    ff_dim: int = 8192
    n_layers: int = 24
    vocab_size: int = 51200
    max_context: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 32
    prefix_attn: int = 730  # informational: the model derives its bidirectional prefix from the vision grid
    group_size: int | None = None  # set only by int4-quantized checkpoints, which we do not load

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Rotary embedding covers the first half of each head (32 of 64 dims for the real model)."""
        return self.dim // (2 * self.n_heads)


@dataclass(frozen=True)
class RegionConfig:
    """The heads that read and write coordinates and sizes (detect / point)."""

    dim: int = 2048
    coord_feat_dim: int = 256
    coord_out_dim: int = 1024
    size_feat_dim: int = 512
    size_out_dim: int = 2048
    inner_dim: int = 8192
    group_size: int | None = None


def _starmie_templates() -> dict[str, dict[str, list[int]] | None]:
    # Token ids of the 2025-06-21 templates in the moondream/starmie-v1 vocabulary:
    # <|md_reserved_0|> task <|md_reserved_1|> ... <|md_reserved_2|>.
    return {
        "caption": {
            "short": [1, 32708, 2, 12492, 3],
            "normal": [1, 32708, 2, 6382, 3],
            "long": [1, 32708, 2, 4059, 3],
        },
        "query": {"prefix": [1, 15381, 2], "suffix": [3]},
        "detect": {"prefix": [1, 7235, 476, 2], "suffix": [3]},
        "point": {"prefix": [1, 2581, 2], "suffix": [3]},
    }


@dataclass(frozen=True)
class TokenizerConfig:
    """Special token ids and prompt templates (lists of token ids) of one tokenizer generation."""

    bos_id: int = 0
    eos_id: int = 0
    answer_id: int | None = 3
    thinking_id: int | None = 4
    coord_id: int | None = 5
    size_id: int | None = 6
    start_ground_points_id: int | None = 7
    end_ground_id: int | None = 9
    templates: dict[str, dict[str, list[int]] | None] = field(default_factory=_starmie_templates)


@dataclass(frozen=True)
class MoondreamConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any],
                  tokenizer_defaults: TokenizerConfig | None = None) -> MoondreamConfig:
        """Defaults overridden by ``values`` (the ``config`` section of ``config.json``).

        ``tokenizer_defaults`` replaces the starmie-era token ids for checkpoints of the older generation.
        """
        try:
            text = TextConfig(**values.get("text", {}))
            vision = VisionConfig(**values.get("vision", {}))
            region = RegionConfig(**values.get("region", {}))
            tokenizer = dataclasses.replace(tokenizer_defaults or TokenizerConfig(), **values.get("tokenizer", {}))
        except TypeError as exc:
            raise ModelLoadError(f"moondream2 config.json: unknown or malformed field ({exc})") from None
        return cls(text=text, vision=vision, region=region, tokenizer=tokenizer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": dataclasses.asdict(self.text),
            "vision": dataclasses.asdict(self.vision),
            "region": dataclasses.asdict(self.region),
            "tokenizer": dataclasses.asdict(self.tokenizer),
        }

    def validate(self) -> None:
        """Refuse shapes this implementation cannot run, with the reason."""
        if self.text.group_size is not None or self.region.group_size is not None:
            raise ModelLoadError("moondream2: int4-quantized checkpoints (group_size set) are not supported; "
                                 "use the bf16 release")
        if self.text.dim % self.text.n_heads or self.text.n_heads % self.text.n_kv_heads:
            raise ModelLoadError("moondream2 config: dim must divide into n_heads, n_heads into n_kv_heads")
        if self.vision.enc_dim % self.vision.enc_n_heads:
            raise ModelLoadError("moondream2 config: enc_dim must divide into enc_n_heads")
        if self.vision.proj_out_dim != self.text.dim or self.region.dim != self.text.dim:
            raise ModelLoadError("moondream2 config: proj_out_dim and region.dim must equal text.dim")
        if 2 * self.vision.overlap_margin >= self.vision.grid:
            raise ModelLoadError("moondream2 config: overlap_margin must leave part of each crop unshared")


def tiny_config(vocab_size: int, tokenizer: TokenizerConfig) -> MoondreamConfig:
    """A few-kilobyte model of the same architecture: 28-pixel crops of 7-pixel patches (a 4x4 grid)."""
    return MoondreamConfig(
        text=TextConfig(dim=64, ff_dim=128, n_layers=2, vocab_size=vocab_size, max_context=512, n_heads=4,
                        n_kv_heads=4, prefix_attn=17),
        vision=VisionConfig(enc_dim=32, enc_patch_size=7, enc_n_layers=2, enc_ff_dim=64, enc_n_heads=2,
                            proj_out_dim=64, crop_size=28, max_crops=4, overlap_margin=1, proj_inner_dim=128),
        region=RegionConfig(dim=64, coord_feat_dim=16, coord_out_dim=64, size_feat_dim=16, size_out_dim=128,
                            inner_dim=128),
        tokenizer=tokenizer,
    )
