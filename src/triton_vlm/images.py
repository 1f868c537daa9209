"""Decode request image bytes into an RGB PIL image, with limits and clear errors."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from triton_vlm.errors import InvalidInputError
from triton_vlm.memo import BoundedMemo

#: Formats a client may send. Everything PIL opens outside this list is refused (no EPS/PDF parsers on a server).
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})


def image_bytes_from_tensor(array: npt.NDArray[Any]) -> bytes:
    """The raw file bytes of one request's ``image`` tensor (UINT8, shape [n] or [1, n])."""
    if array.dtype != np.uint8:
        raise InvalidInputError(f"image: expected a UINT8 tensor of encoded file bytes, got {array.dtype}",
                                param="image")
    if array.ndim > 2 or (array.ndim == 2 and array.shape[0] != 1):
        raise InvalidInputError(f"image: expected shape [n] or [1, n] of file bytes, got {list(array.shape)}",
                                param="image")
    return array.tobytes()


def images_from_tensor(array: npt.NDArray[Any]) -> list[bytes]:
    """The file bytes of each image in one request's ``images`` tensor (BYTES, shape [n] or [1, n])."""
    if array.dtype != np.object_:
        raise InvalidInputError(f"images: expected a BYTES tensor with one encoded file per element, got {array.dtype}",
                                param="images")
    if array.ndim > 2 or (array.ndim == 2 and array.shape[0] != 1):
        raise InvalidInputError(f"images: expected shape [n] or [1, n] (one element per image), got "
                                f"{list(array.shape)}", param="images")
    found = []
    for index, value in enumerate(array.reshape(-1)):
        if not isinstance(value, bytes):
            raise InvalidInputError(f"images[{index}]: expected the bytes of an image file", param="images")
        found.append(value)
    return found


def image_list(images: Image.Image | Sequence[Image.Image] | None) -> list[Image.Image]:
    """A request's images as a list: one image (the ``prompt`` form), a chat's list (maybe empty), or none."""
    if images is None:
        return []
    return [images] if isinstance(images, Image.Image) else list(images)


#: Where an image decoded by :class:`DecodedImages` keeps the digest of the file it came from (PIL's ``info``).
DIGEST_KEY = "triton_vlm.file_digest"


def file_digest(data: bytes) -> bytes:
    """A digest of an image file's bytes (SHA-256, which CPUs hash fastest: ~0.25 ms for a 340 KB PNG)."""
    return hashlib.sha256(data).digest()[:16]


class DecodedImages:
    """Recently decoded images by the digest of their file, up to ``capacity`` bytes of pixels: a chat resends its
    image with every turn, and decoding it again costs milliseconds of the turn's first token. Each image it returns
    carries that digest (:data:`DIGEST_KEY` in its ``info``), and is shared: nobody may change it in place.

    A file is decoded (and checked against the limits) once; the same bytes again are the same valid image."""

    def __init__(self, capacity: int) -> None:
        self._images: BoundedMemo[bytes, Image.Image] = BoundedMemo(capacity)

    def decode(self, data: bytes, *, max_bytes: int, max_pixels: int, max_aspect_ratio: float | None = None,
               field: str = "image") -> Image.Image:
        """:func:`decode_image`, or the image these bytes gave before."""
        digest = file_digest(data) if data and len(data) <= max_bytes else b""
        found = self._images.get(digest) if digest else None
        if found is not None:
            return found
        image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio,
                             field=field)
        image.info[DIGEST_KEY] = digest
        self._images.put(digest, image, image.width * image.height * len(image.getbands()))
        return image


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int,
                 max_aspect_ratio: float | None = None, field: str = "image") -> Image.Image:
    """Open PNG/JPEG/... bytes as an upright RGB image.

    Raises :class:`InvalidInputError` for empty, oversized, truncated or unknown data, for images above
    ``max_pixels`` or more elongated than ``max_aspect_ratio`` (both checked from the header, before any pixel is
    decoded) and for multi-frame files. ``field`` names the image in messages (``images[1]``); ``param`` is its
    input (``images``). Every failure while decoding is an :class:`InvalidInputError`: PIL's own
    exceptions never escape.

    The aspect ratio matters because processors that resize the shortest edge (CLIP's, for llava) keep it: a
    40 KB PNG of 1 x 40000 pixels would become 336 x 13 million pixels, many GB.
    """
    param = field.split("[")[0]
    if not data:
        raise InvalidInputError(f"{field}: empty; send the bytes of a PNG or JPEG file", param=param)
    if len(data) > max_bytes:
        raise InvalidInputError(f"{field}: {len(data)} bytes is over the limit of {max_bytes} bytes", param=param)
    try:
        return _decode(data, max_pixels, max_aspect_ratio, field)
    except InvalidInputError:
        raise
    except Exception as exc:  # a last net: PIL raises a zoo of types (IndexError, struct.error, ...) on bad data
        raise InvalidInputError(
            f"{field}: cannot decode {len(data)} bytes ({type(exc).__name__}: {exc}); send an intact PNG or JPEG",
            param=param) from None


def _decode(data: bytes, max_pixels: int, max_aspect_ratio: float | None = None,
            field: str = "image") -> Image.Image:
    param = field.split("[")[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"{field}: not a recognised image file ({len(data)} bytes starting {data[:8]!r}); send PNG or JPEG bytes",
            param=param) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(f"{field}: too many pixels ({exc})", param=param) from None
    except Exception as exc:  # PIL raises a zoo of types for corrupt headers
        raise InvalidInputError(f"{field}: cannot open ({type(exc).__name__}: {exc})", param=param) from None
    if image.format not in ACCEPTED_FORMATS:
        raise InvalidInputError(f"{field}: format {image.format} is not accepted; send PNG or JPEG", param=param)
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInputError(f"{field}: {width}x{height} pixels is over the limit of {max_pixels} pixels",
                                param=param)
    if width < 1 or height < 1:
        raise InvalidInputError(f"{field}: invalid size {width}x{height}", param=param)
    if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
        raise InvalidInputError(
            f"{field}: {width}x{height} is more elongated than the limit of {max_aspect_ratio:g}:1; crop or pad it",
            param=param)
    try:
        # Counting frames reads every frame header: a truncated animation fails here (IndexError, struct.error).
        frames = getattr(image, "n_frames", 1)
    except Exception as exc:
        raise InvalidInputError(
            f"{field}: corrupt or truncated {image.format} data (cannot count its frames: {type(exc).__name__}: {exc})",
            param=param) from None
    if frames > 1:
        raise InvalidInputError(f"{field}: {frames} frames (animated or multi-page); send a single image", param=param)
    try:
        bits = _sample_bits(image)  # before load(): PIL forgets the raw sample layout once pixels are decoded
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image), bits)
    except Exception as exc:
        raise InvalidInputError(f"{field}: corrupt or truncated {image.format} data ({exc})", param=param) from None


def _sample_bits(image: Image.Image) -> tuple[int, bool] | None:
    """``(bits per sample, signed)`` of an integer greyscale image, where the file says; None otherwise."""
    if image.mode.startswith("I;16"):
        return 16, image.mode.endswith("S")
    if image.mode != "I":
        return None
    tags = getattr(image, "tag_v2", None)  # TIFF: BitsPerSample (258), SampleFormat (339, 2 = signed)
    if tags is not None and tags.get(258):
        bits = tags[258]
        bits = bits[0] if isinstance(bits, tuple) else bits
        sample_format = tags.get(339, 1)
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
        return int(bits), sample_format == 2
    for tile in getattr(image, "tile", None) or ():  # e.g. a 16-bit PNG opened as "I" reads raw mode "I;16B"
        args = tile.args if hasattr(tile, "args") else tile[3]
        rawmode = args if isinstance(args, str) else (args[0] if args else "")
        match = re.fullmatch(r"I;(8|16|32)([A-Z]*)", str(rawmode))
        if match:
            return int(match[1]), "S" in match[2]
    return None


def _to_rgb(image: Image.Image, bits: tuple[int, bool] | None = None) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Flatten transparency onto white, as a viewer would show it, not onto black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        # Integer grey (16-bit PNG/TIFF, 32-bit TIFF): scale the file's full sample range to 8 bits, so a dark
        # image stays dark (never by the image's own peak). Without a known depth, values are taken as 8-bit
        # and clipped to 0..255. Negative samples are black.
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") and bits is None:
            bits = (16, image.mode.endswith("S"))
        if bits is not None:
            depth, signed = bits
            array = array * (255.0 / float(2 ** (depth - 1 if signed else depth) - 1))
        grey = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")
