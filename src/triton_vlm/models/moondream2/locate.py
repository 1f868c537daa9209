"""detect / point: the reference's region decoding loop, answering JSON with pixel coordinates.

After the prompt, the model either emits EOS (no more objects) or starts an object. An object is decoded from
hidden states by the region heads, not sampled as text: x centre, then y centre, then (detect only) width and
height; each value is fed back as an embedding before the next is read. Everything is greedy, as in the
reference. One request at a time: the loop's shape depends on how many objects each image has.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from PIL import Image

from triton_vlm.models.generation import GenerationOutput
from triton_vlm.models.moondream2.model import Moondream2Model
from triton_vlm.models.moondream2.processor import Moondream2Processor
from triton_vlm.models.moondream2.tasks import Task

#: The reference's default cap on objects per request.
MAX_OBJECTS = 50


class _Stepper:
    """Runs single decode steps for one request, keeping its position and attention mask."""

    def __init__(self, model: Moondream2Model, cache: Any, length: int) -> None:
        self.model, self.cache, self.position = model, cache, length
        self.mask = torch.ones((1, length), dtype=torch.long, device=model.device)

    @property
    def room(self) -> int:
        return self.model.config.text.max_context - self.position

    def __call__(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.mask = torch.cat([self.mask, self.mask.new_ones((1, 1))], dim=-1)
        positions = torch.tensor([[self.position]], device=self.model.device)
        self.position += 1
        return self.model.step(embeds.reshape(1, 1, -1), self.mask, positions, self.cache)


@torch.inference_mode()
def locate(model: Moondream2Model, processor: Moondream2Processor, image: Image.Image, task: Task,
           prompt: str, max_objects: int = MAX_OBJECTS) -> GenerationOutput:
    """Boxes (detect) or points (point) of ``prompt`` in ``image``, as a JSON :class:`GenerationOutput`."""
    from transformers import DynamicCache

    inputs = processor([image], [processor.prompt_tokens(task, prompt)])
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    length = inputs["input_ids"].shape[1]
    positions = torch.arange(length, device=model.device)[None]
    cache = DynamicCache()
    hidden, logits = model.prefill(**inputs, position_ids=positions, cache=cache)
    step = _Stepper(model, cache, length)
    steps_per_object = 3 if task.kind == "detect" else 2
    region, eos = model.region, processor.tokens.eos_id

    found: list[dict[str, float]] = []
    finish = "stop"
    while int(logits.argmax(-1)) != eos:
        if len(found) >= max_objects or step.room < steps_per_object:
            finish = "length"
            break
        x = region.decode_coordinate(hidden)
        hidden, _ = step(region.encode_coordinate(x))
        y = region.decode_coordinate(hidden)
        feedback = region.encode_coordinate(y)
        if task.kind == "detect":
            hidden, _ = step(feedback)
            size = region.decode_size(hidden)
            feedback = region.encode_size(size)
            found.append(_box(float(x), float(y), float(size[..., 0]), float(size[..., 1]), image))
        else:
            found.append(_point(float(x), float(y), image))
        hidden, logits = step(feedback)

    key = "objects" if task.kind == "detect" else "points"
    payload = {key: found, "image_size": {"width": image.width, "height": image.height}}
    return GenerationOutput(text=json.dumps(payload), token_ids=(), prompt_tokens=length, finish_reason=finish)


def _box(x: float, y: float, width: float, height: float, image: Image.Image) -> dict[str, float]:
    """Centre and size (fractions of the image) -> pixel corners, clipped to the image."""
    def clip(value: float, side: int) -> float:
        return round(min(max(value, 0.0), 1.0) * side, 2)

    return {
        "x_min": clip(x - width / 2, image.width), "y_min": clip(y - height / 2, image.height),
        "x_max": clip(x + width / 2, image.width), "y_max": clip(y + height / 2, image.height),
    }


def _point(x: float, y: float, image: Image.Image) -> dict[str, float]:
    return {"x": round(x * image.width, 2), "y": round(y * image.height, 2)}
