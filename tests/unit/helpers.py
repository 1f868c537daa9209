"""Small builders shared by the unit tests (images, ports)."""

from __future__ import annotations

import io
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "triton_models"
SAMPLE_IMAGE = ROOT / "test_images" / "sample_image.jpg"

BIG = 10**9  # a limit that never triggers


def rgb_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def image_bytes(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    return encode(Image.fromarray(rgb_array(width, height, seed)), fmt)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG of ``width`` x ``height`` (8-bit grey) with almost no pixel data: a few hundred bytes
    that claim a huge image (the shape of a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def multi_frame(fmt: str, frames: int = 2, size: tuple[int, int] = (24, 20)) -> bytes:
    images = [Image.fromarray(rgb_array(*size, seed=i)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt, save_all=True, append_images=images[1:])
    return buffer.getvalue()


def free_port() -> int:
    """A loopback port nobody listens on (bound to 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def truncated_animated_gif() -> bytes:
    """A 2-frame GIF cut off 10 bytes into its second frame (an interrupted upload of an animation)."""
    first_frame_only = encode(Image.fromarray(rgb_array(24, 20, seed=0)), "GIF")
    return multi_frame("GIF")[: len(first_frame_only) + 10]


def noise(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image of uniform noise."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def load_tiny(family_name: str, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any, Any]:
    """``(family, model, processor)``: ``family_name``'s tiny checkpoint on ``device`` in ``dtype`` (float32)."""
    import torch

    from triton_vlm.models import get_family
    from triton_vlm.tiny import ensure_tiny_checkpoint

    family = get_family(family_name)
    model, processor = family.load(str(ensure_tiny_checkpoint(family_name)), revision=None,
                                   dtype=dtype or torch.float32, device=torch.device(device), local_files_only=True,
                                   trust_remote_code=False)
    return family, model, processor


def batched_greedy(loaded: tuple[Any, Any, Any], images: list[Image.Image], prompts: list[str],
                   max_tokens: list[int]) -> list[list[int]]:
    """What the batched loop (``generate_batch``) answers greedily: the engine tests' reference token ids."""
    from triton_vlm.models.generation import generate_batch
    from triton_vlm.sampling import SamplingParams

    family, model, processor = loaded
    outputs = generate_batch(family, model, processor, images, prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
    return [list(o.token_ids) for o in outputs]


@dataclass(frozen=True)
class ParityCase:
    """A tiny family's engine checked against the batched loop on the same images (noise of ``sizes``, seeded by
    position), prompts and lengths."""

    family: str
    prompts: list[str]
    sizes: list[tuple[int, int]]
    max_tokens: list[int]
    images: list[Image.Image] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", [noise(w, h, seed) for seed, (w, h) in enumerate(self.sizes)])

    def load(self, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any, Any]:
        return load_tiny(self.family, device, dtype)

    def reference(self, loaded: tuple[Any, Any, Any]) -> list[list[int]]:
        return batched_greedy(loaded, self.images, self.prompts, self.max_tokens)

    def items(self) -> list[tuple[Image.Image, str, Any]]:
        """The engine's ``generate`` arguments for the same requests."""
        from triton_vlm.sampling import SamplingParams

        return [(image, prompt, SamplingParams(max_tokens=m))
                for image, prompt, m in zip(self.images, self.prompts, self.max_tokens, strict=True)]

    @staticmethod
    def engine(loaded: tuple[Any, Any, Any], **config: Any) -> Any:
        """An :class:`LLMEngine` over ``loaded`` (256 positions unless ``config`` says otherwise)."""
        from triton_vlm.engine import EngineConfig, LLMEngine

        family, model, processor = loaded
        return LLMEngine(family, model, processor, EngineConfig(**{"max_model_len": 256, **config}))


def parity_fixtures(case: ParityCase) -> tuple[Any, Any]:
    """Module-scoped ``loaded`` and ``reference`` fixtures for ``case``: ``loaded, reference = parity_fixtures(CASE)``."""
    import pytest

    @pytest.fixture(scope="module")
    def loaded() -> tuple[Any, Any, Any]:
        return case.load()

    @pytest.fixture(scope="module")
    def reference(loaded: tuple[Any, Any, Any]) -> list[list[int]]:
        return case.reference(loaded)

    return loaded, reference


def counting(decode: Callable[[list[int]], str]) -> tuple[Callable[[list[int]], str], list[int]]:
    """``decode`` that records how many tokens each call decoded."""
    sizes: list[int] = []

    def wrapped(ids: list[int]) -> str:
        sizes.append(len(ids))
        return decode(ids)
    return wrapped, sizes


def spy_detokenize(monkeypatch: Any, family: Any) -> list[int]:
    """Record how many tokens each ``detokenize`` call of ``family``'s class decodes (the list grows per call)."""
    cls = type(family)
    detokenize = cls.detokenize
    sizes: list[int] = []

    def spying(self: Any, processor: Any, token_ids: list[int]) -> str:
        sizes.append(len(token_ids))
        return detokenize(self, processor, token_ids)
    monkeypatch.setattr(cls, "detokenize", spying)
    return sizes


def chunk_starts_inside_images(engine: Any) -> list[bool]:
    """Wrap ``engine``'s scheduler: the returned list grows by one entry per prefill chunk, whether the chunk starts
    among its request's image rows (so one image's rows are split between chunks)."""
    inside: list[bool] = []
    schedule = engine.scheduler.schedule

    def recording() -> Any:
        plan = schedule()
        for c in plan.prefill:
            rows = c.seq.request.mm_inputs["image_rows"]
            inside.append(rows[0] < c.start <= rows[-1])
        return plan

    engine.scheduler.schedule = recording
    return inside
