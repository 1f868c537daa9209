"""Skills a moondream2 request can ask for, named by the request's optional ``task`` string.

* ``query`` (the default): answer the prompt about the image.
* ``caption`` / ``caption:short`` / ``caption:normal`` / ``caption:long``: describe the image; no prompt needed.
* ``detect``: bounding boxes of the object named by the prompt, as JSON in pixels.
* ``point``: centre points of the object named by the prompt, as JSON in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from triton_vlm.errors import InvalidInputError

KINDS = ("query", "caption", "detect", "point")
CAPTION_LENGTHS = ("short", "normal", "long")


@dataclass(frozen=True)
class Task:
    kind: str = "query"
    length: str = "normal"  # captions only

    @property
    def name(self) -> str:
        """Canonical spelling, accepted back by :func:`parse_task`."""
        return f"caption:{self.length}" if self.kind == "caption" else self.kind

    @property
    def is_region(self) -> bool:
        """Answers with coordinates from the region heads instead of text."""
        return self.kind in ("detect", "point")

    @property
    def needs_prompt(self) -> bool:
        return self.kind != "caption"


def parse_task(value: str | None) -> Task:
    """``None`` or empty -> query; raises :class:`InvalidInputError` listing the accepted spellings."""
    text = (value or "").strip().lower()
    if not text:
        return Task()
    kind, _, option = text.partition(":")
    kind, option = kind.strip(), option.strip()
    if kind == "caption" and option in ("", *CAPTION_LENGTHS):
        return Task("caption", option or "normal")
    if kind in KINDS and kind != "caption" and not option:
        return Task(kind)
    accepted = ", ".join(["query", "caption", *(f"caption:{n}" for n in CAPTION_LENGTHS), "detect", "point"])
    raise InvalidInputError(f"task: unknown moondream2 task {value!r}; use one of: {accepted}", param="task")
