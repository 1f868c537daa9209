"""Grounded answers as typed objects, and drawing them on the image (no torch needed).

Two sources: kosmos2's ``entities`` output (JSON list of ``{"phrase", "span", "boxes", "boxes_px"}``) and
moondream2's ``detect`` / ``point`` answers (JSON ``{"objects": [...]}`` / ``{"points": [...]}`` in pixels, with
``image_size``). A point is a :class:`Box` of zero size; :func:`draw_entities` marks it with a dot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from triton_vlm.errors import InvalidInputError

#: Box colours, cycled over the entities (Tableau 10).
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")


@dataclass(frozen=True)
class Box:
    """Corners of a box: normalized (0..1) or in pixels, depending on where it is found."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Box:
        return cls(float(data["x_min"]), float(data["y_min"]), float(data["x_max"]), float(data["y_max"]))

    @property
    def is_point(self) -> bool:
        return self.x_min == self.x_max and self.y_min == self.y_max


@dataclass(frozen=True)
class Entity:
    """A phrase of the answer and where it is in the image.

    ``span``: ``(start, end)`` character offsets of the phrase in the answer text (zero width for an object the
    answer does not name; None where the answer is not text, as moondream2's JSON). ``boxes``: normalized to
    0..1; ``boxes_px``: the same boxes in pixels of the original image.
    """

    phrase: str
    span: tuple[int, int] | None
    boxes: list[Box] = field(default_factory=list)
    boxes_px: list[Box] = field(default_factory=list)


def parse_entities(data: str | bytes | list[dict[str, Any]]) -> list[Entity]:
    """Entities from kosmos2's ``entities`` output (its JSON text, or the decoded list)."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"entities: not JSON ({exc})") from None
    if not isinstance(data, list):
        raise InvalidInputError(f"entities: expected a JSON list, got {type(data).__name__}")
    try:
        return [Entity(phrase=str(item["phrase"]),
                       span=None if item.get("span") is None else (int(item["span"][0]), int(item["span"][1])),
                       boxes=[Box.from_dict(b) for b in item.get("boxes", [])],
                       boxes_px=[Box.from_dict(b) for b in item.get("boxes_px", [])])
                for item in data]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InvalidInputError(f"entities: malformed entity ({type(exc).__name__}: {exc})") from None


def entities_from_answer(text: str, label: str = "") -> list[Entity]:
    """One entity (named ``label``) for a moondream2 ``detect`` or ``point`` answer; [] for any other text.

    The answer is in pixels, with ``image_size``: normalized boxes are those divided by the image size.
    """
    try:
        answer = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return []
    if not isinstance(answer, dict) or not ({"objects", "points"} & answer.keys()):
        return []
    size = answer.get("image_size") or {}
    width, height = float(size.get("width") or 0), float(size.get("height") or 0)
    pixels = [Box.from_dict(o) for o in answer.get("objects", [])]
    pixels += [Box(float(p["x"]), float(p["y"]), float(p["x"]), float(p["y"])) for p in answer.get("points", [])]
    if not pixels:
        return []
    normalized = [Box(b.x_min / width, b.y_min / height, b.x_max / width, b.y_max / height)
                  for b in pixels] if width and height else []
    return [Entity(phrase=label, span=None, boxes=normalized, boxes_px=pixels)]


def draw_entities(image: Image.Image, entities: Sequence[Entity], *, width: int | None = None) -> Image.Image:
    """A copy of ``image`` (RGB) with each entity's pixel boxes outlined and labelled with its phrase; points
    are dots. Boxes are clipped to the image. ``width``: line width (default: from the image size)."""
    canvas = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(canvas)
    line = width or max(2, round(min(canvas.size) / 160))
    font = _font(max(10, round(min(canvas.size) / 30)))
    for index, entity in enumerate(entities):
        colour = PALETTE[index % len(PALETTE)]
        for box in entity.boxes_px:
            x0, y0 = _clip(box.x_min, canvas.width), _clip(box.y_min, canvas.height)
            x1, y1 = _clip(box.x_max, canvas.width), _clip(box.y_max, canvas.height)
            if box.is_point:
                radius = line * 2
                draw.ellipse((x0 - radius, y0 - radius, x0 + radius, y0 + radius), fill=colour, outline="white")
                anchor = (x0 + radius, y0 - radius)
            else:
                draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=colour, width=line)
                anchor = (min(x0, x1), min(y0, y1))
            if entity.phrase:
                _label(draw, anchor, entity.phrase, colour, font, canvas.size)
    return canvas


def _clip(value: float, side: int) -> float:
    return min(max(value, 0.0), side - 1.0)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, anchor: tuple[float, float], text: str, colour: str, font: Any,
           size: tuple[int, int]) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    text_w, text_h = right - left + 4, bottom - top + 4
    x = min(max(anchor[0], 0), max(size[0] - text_w, 0))
    y = anchor[1] - text_h if anchor[1] - text_h >= 0 else anchor[1]
    draw.rectangle((x, y, x + text_w, y + text_h), fill=colour)
    draw.text((x + 2 - left, y + 2 - top), text, fill="white", font=font)
