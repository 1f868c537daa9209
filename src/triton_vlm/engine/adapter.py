"""What the engine needs from a model family, and nothing else: the engine imports no family.

A family (``triton_vlm.models.<family>``) plugs in through three pieces defined here:

* :class:`EngineFamily`: the family object the engine is built for (``ModelFamily`` satisfies it);
* :class:`EngineAdapter`: tokenized prompts, image features and prompt embeddings, and the decoder to build;
* :class:`Decoder`: the language model's forward over the slot KV cache (the generic
  :class:`~triton_vlm.engine.decoders.llama.LlamaDecoder`, or one of the family's own).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeGuard

import torch

from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.request import EngineRequest
from triton_vlm.engine.transfer import device_longs, device_pixels

if TYPE_CHECKING:
    from triton_vlm.structured import Grammars


class Decoder(Protocol):
    """A language model's forward over the slot KV cache, as the runner drives it.

    Optional members, looked up with ``getattr``: ``mixes`` (see :class:`MixingDecoder`), ``multimodal_positions``
    (see :class:`PositionedDecoder`) and ``quantize(method)`` (where the projections can be quantized)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    #: Whether the fused Triton kernels run (a CUDA device); decode attention then reads each row's length on the
    #: device and needs no context bound.
    fused: bool
    #: Token ids -> embeddings [tokens, hidden] (the model's own embedding module).
    embed_tokens: Callable[[torch.Tensor], torch.Tensor]

    def prefill(self, embeds: torch.Tensor, chunks: list[tuple[int, int, int]], cache: SlotKVCache) -> torch.Tensor:
        """Packed prompt chunks (``(slot, start, length)``, back to back in ``embeds`` [tokens, hidden]); each
        chunk's last hidden state [chunks, hidden]."""
        ...

    def decode(self, tokens: torch.Tensor, write_positions: torch.Tensor, lengths: torch.Tensor,
               cache: SlotKVCache, context: int | None = None) -> torch.Tensor:
        """One token for each of the first ``batch`` slots; logits [batch, vocab]."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: [rows, hidden] -> [rows, vocab]."""
        ...


class MixingDecoder(Decoder, Protocol):
    """A :class:`Decoder` that can run a step's prompt chunks and decode rows as one forward, where ``mixes``."""

    mixes: bool

    def prefill_and_decode(self, embeds: torch.Tensor, chunks: list[tuple[int, int, int]], cache: SlotKVCache,
                           tokens: torch.Tensor, write_positions: torch.Tensor, lengths: torch.Tensor,
                           context: int | None = None, prompt_positions: torch.Tensor | None = None,
                           decode_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`prefill` and :meth:`decode` (same arguments) as one forward: (logits after each chunk
        [chunks, vocab], decode logits [batch, vocab]). The positions: as :class:`PositionedDecoder`'s (None: the
        rows' cache positions)."""
        ...


def mixes(decoder: Decoder) -> TypeGuard[MixingDecoder]:
    """Whether ``decoder`` runs prompt chunks and decode rows as one forward (its ``mixes`` is set and true)."""
    return bool(getattr(decoder, "mixes", False))


class PositionedDecoder(Decoder, Protocol):
    """A :class:`Decoder` whose rotary positions are not its cache positions (multimodal RoPE, where
    ``multimodal_positions``): each prompt brings its own (:meth:`EngineAdapter.rope_positions`), and a decode
    row's is ``length - 1 + rope_delta``, its slot's offset in a device tensor the runner keeps."""

    multimodal_positions: bool

    def prefill(self, embeds: torch.Tensor, chunks: list[tuple[int, int, int]], cache: SlotKVCache,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`Decoder.prefill`, the packed rows rotated by ``positions`` ([rows, tokens] or [tokens])."""
        ...

    def decode(self, tokens: torch.Tensor, write_positions: torch.Tensor, lengths: torch.Tensor,
               cache: SlotKVCache, context: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`Decoder.decode`, each row rotated by ``positions`` [batch]."""
        ...


def positioned(decoder: Decoder) -> TypeGuard[PositionedDecoder]:
    """Whether ``decoder`` takes its rows' rotary positions from the runner (``multimodal_positions`` set and true).
    Only then does the runner keep per-request positions and offsets: other models pay nothing for them."""
    return bool(getattr(decoder, "multimodal_positions", False))


class RowsDecoder(Decoder, Protocol):
    """A :class:`Decoder` whose decode rows may name their slots (``slotted_rows``): a short prompt chunk then runs
    as one row per position, all in its slot, through the decode step's graphs (:meth:`ModelRunner.prefill_rows`)."""

    slotted_rows: bool

    def decode(self, tokens: torch.Tensor, write_positions: torch.Tensor, lengths: torch.Tensor,
               cache: SlotKVCache, context: int | None = None, positions: torch.Tensor | None = None,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`Decoder.decode`, row i in slot ``slots[i]`` (default: slot i)."""
        ...


def slotted(decoder: Decoder) -> TypeGuard[RowsDecoder]:
    """Whether ``decoder``'s decode rows may name their slots (``slotted_rows`` set and true)."""
    return bool(getattr(decoder, "slotted_rows", False))


class EngineFamily(Protocol):
    """The model family an engine serves (``triton_vlm.models.ModelFamily`` is one)."""

    @property
    def name(self) -> str: ...

    def engine_adapter(self) -> EngineAdapter | None:
        """How the engine runs this family; None where it does not."""
        ...

    def stop_token_ids(self, model: Any, processor: Any) -> set[int]:
        """The token ids that end an answer."""
        ...

    def grammars(self, processor: Any, stop_token_ids: Iterable[int]) -> Grammars:
        """The ``response_format`` grammar compiler for this family's tokenizer."""
        ...

    def render_input(self, processor: Any, prompt: Any, task: str | None = None) -> Any:
        """A request's prompt string or conversation (``triton_vlm.chat.Chat``) as the text (or token ids) that
        :meth:`EngineAdapter.prepare` takes."""
        ...


@dataclass(frozen=True)
class ProcessedImage:
    """What the processor made of one image, kept for a later request about the same image
    (:meth:`EngineAdapter.processed_image`): the prompt positions it takes and its inputs (pixels, sizes...).
    Shared between requests: nobody may change it."""

    rows: int
    inputs: dict[str, Any]
    #: Bytes of its tensors.
    size: int


def expand_image_placeholder(processor: Any, text: Any, rows: int) -> tuple[list[int], list[int]] | None:
    """The token ids the LLaVA and Qwen2-VL processors make of ``text`` with its one image placeholder
    (``processor.image_token``) expanded to ``rows`` copies, and the positions of those rows; None where ``text``
    does not hold exactly one. They expand the text, then tokenize it; the placeholder is a special token, so the
    text around it tokenizes alike either way, and splicing the run into the ids of the unexpanded text is the
    same (and five times quicker than tokenizing 576 placeholders)."""
    placeholder = processor.image_token
    if not isinstance(text, str):
        return None
    ids = list(processor.tokenizer(text)["input_ids"])
    image_token = processor.tokenizer.convert_tokens_to_ids(placeholder)
    found = [row for row, token in enumerate(ids) if token == image_token]
    if len(found) != 1:
        return None
    (at,) = found
    return ids[:at] + [image_token] * rows + ids[at + 1:], list(range(at, at + rows))


class EngineAdapter(ABC):
    """One per model family the engine runs (``EngineFamily.engine_adapter()``)."""

    @abstractmethod
    def prepare(self, family: Any, processor: Any, images: list[Any], text: Any) -> tuple[list[int], dict[str, Any]]:
        """Prompt token ids (image placeholders expanded) and the multimodal inputs for one request: ``images``
        (PIL images, in the order the prompt places them; none for a text-only turn) and ``text``, the prompt as
        the family rendered it (``EngineFamily.render_input``: chat template applied, image placeholders in).
        ``image_rows`` lists the prompt positions that take the images' features, in order, and ``pixel_values``
        holds the pixels where there are images (a text-only request has neither: no rows, no pixels, and the
        engine's vision step leaves it out). ``family`` is the :class:`EngineFamily` this adapter came from."""

    #: Whether a later one-image request about an image this adapter prepared before is built from what the
    #: processor made of it (:meth:`reuse_image`): true where the processor only expands the prompt's one image
    #: placeholder into the image's rows (the LLaVA families, Qwen2-VL).
    reuses_images: ClassVar[bool] = False
    #: Inputs of :meth:`prepare` that follow the prompt's tokens rather than the image: a reused request gets its
    #: own (:meth:`token_inputs`).
    per_token_inputs: ClassVar[tuple[str, ...]] = ()

    def processed_image(self, mm_inputs: dict[str, Any]) -> ProcessedImage | None:
        """The image's part of a one-image request's :meth:`prepare` (all but ``image_rows`` and the
        :attr:`per_token_inputs`), kept for :meth:`reuse_image`; None where the family does not reuse images."""
        if not self.reuses_images:
            return None
        inputs = {key: value for key, value in mm_inputs.items()
                  if key != "image_rows" and key not in self.per_token_inputs}
        return ProcessedImage(len(mm_inputs["image_rows"]), inputs,
                              sum(value.nbytes for value in inputs.values() if isinstance(value, torch.Tensor)))

    def reuse_image(self, processor: Any, image: ProcessedImage, text: Any) -> tuple[list[int], dict[str, Any]] | None:
        """:meth:`prepare` of a one-image request whose image was processed before (``image``), without running
        the image processor again: ``text`` is tokenized and the image's rows spliced in. None where it cannot
        (then :meth:`prepare` runs)."""
        expanded = expand_image_placeholder(processor, text, image.rows) if self.reuses_images else None
        if expanded is None:
            return None
        ids, rows = expanded
        return ids, {**image.inputs, **self.token_inputs(ids, rows), "image_rows": rows}

    def token_inputs(self, ids: list[int], rows: list[int]) -> dict[str, Any]:
        """The :attr:`per_token_inputs` of a reused request (its token ``ids``, the image at ``rows``); none by
        default."""
        return {}

    def rope_positions(self, model: Any, prompt_ids: list[int],
                       mm_inputs: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
        """For a :class:`PositionedDecoder`: a prepared prompt's rotary positions ([rows, prompt_len], on the host)
        and its ``rope_delta`` (a generated token's rotary position minus its cache position). Runs on the
        caller's thread with :meth:`prepare`; None (the default): the cache positions."""
        return None

    @abstractmethod
    def build_decoder(self, model: Any) -> Decoder:
        """The language model's forward over the slot cache."""

    @abstractmethod
    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower over a batch of pixels on the device (whole images, or moondream2's crops), with the
        projector where it works on each row alone."""

    def image_shape(self, model: Any) -> tuple[int, ...] | None:
        """The one shape every row of pixels reaches :meth:`encode_images` in (then the engine replays it as CUDA
        graphs); None where shapes vary."""
        return None

    def image_features(self, model: Any, requests: list[EngineRequest],
                       encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The requests' images through ``encode`` (this adapter's :meth:`encode_images` for ``model``, graphed
        where it can be) in one batch: a row per image row of the prompts, in order. Only requests with images
        come here (:meth:`prompt_embeds` leaves the others out)."""
        return encode(device_pixels([r.mm_inputs["pixel_values"] for r in requests], model.device, model.dtype))

    def prompt_embeds(self, model: Any, decoder: Decoder, requests: list[EngineRequest],
                      encode: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """[prompt_len, hidden] embeddings per request, image features at their ``image_rows``.

        One embedding lookup and one scatter for the whole batch, and nothing that waits for the device (no
        pageable copies, no boolean-mask indexing): per-request launches would leave the device idle while the
        host, sharing its GIL with the thread that tokenizes new requests, works through them. Text-only requests
        (no ``image_rows``) take no part in the vision step."""
        lengths = [len(r.prompt_ids) for r in requests]
        embeds = decoder.embed_tokens(device_longs([t for r in requests for t in r.prompt_ids], model.device))
        # Each request's first row; the running total has one entry more (the end), which zip leaves out.
        rows = [start + row for start, r in zip(itertools.accumulate([0, *lengths]), requests, strict=False)
                for row in r.mm_inputs.get("image_rows", ())]
        if rows:
            features = self.image_features(model, [r for r in requests if r.mm_inputs.get("image_rows")], encode)
            embeds[device_longs(rows, model.device)] = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return list(embeds.split(lengths))

    @abstractmethod
    def context_length(self, model: Any) -> int:
        """Positions the language model was trained for: the engine's context is at most this."""

    def min_first_chunk(self, model: Any) -> int:
        """Positions a prompt's first prefill chunk must hold: a prefix that attends both ways (0: none)."""
        return 0

    def accepts(self, task: str | None) -> bool:
        """Whether the engine runs requests of ``task`` (normalized; None: the family's default)."""
        return task is None


def vision_tower_shape(vision_config: Any) -> tuple[int, int, int]:
    """``(channels, size, size)``: the pixels a Hugging Face vision config's tower takes (CLIP-like)."""
    return (vision_config.num_channels, vision_config.image_size, vision_config.image_size)
