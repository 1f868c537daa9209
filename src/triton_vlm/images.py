"""Decode request image bytes into an RGB PIL image, with limits and clear errors."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from triton_vlm.errors import InvalidInputError

#: Formats a client may send. Everything PIL opens outside this list is refused (no EPS/PDF parsers on a server).
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})


def image_bytes_from_tensor(array: np.ndarray) -> bytes:
    """The raw file bytes of one request's ``image`` tensor (UINT8, shape [n] or [1, n])."""
    if array.dtype != np.uint8:
        raise InvalidInputError(f"image: expected a UINT8 tensor of encoded file bytes, got {array.dtype}")
    if array.ndim > 2 or (array.ndim == 2 and array.shape[0] != 1):
        raise InvalidInputError(f"image: expected shape [n] or [1, n] of file bytes, got {list(array.shape)}")
    return array.tobytes()


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open PNG/JPEG/... bytes as an upright RGB image.

    Raises :class:`InvalidInputError` for empty, oversized, truncated or unknown data, for images above
    ``max_pixels`` (checked from the header, before any pixel is decoded) and for multi-frame files.
    """
    if not data:
        raise InvalidInputError("image: empty; send the bytes of a PNG or JPEG file")
    if len(data) > max_bytes:
        raise InvalidInputError(f"image: {len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"image: not a recognised image file ({len(data)} bytes starting {data[:8]!r}); send PNG or JPEG bytes"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(f"image: too many pixels ({exc})") from None
    except Exception as exc:  # PIL raises a zoo of types for corrupt headers
        raise InvalidInputError(f"image: cannot open ({type(exc).__name__}: {exc})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise InvalidInputError(f"image: format {image.format} is not accepted; send PNG or JPEG")
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInputError(f"image: {width}x{height} pixels is over the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        raise InvalidInputError(f"image: invalid size {width}x{height}")
    if getattr(image, "n_frames", 1) > 1:
        raise InvalidInputError(f"image: {image.n_frames} frames (animated or multi-page); send a single image")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Exception as exc:
        raise InvalidInputError(f"image: corrupt or truncated {image.format} data ({exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Flatten transparency onto white, as a viewer would show it, not onto black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits instead of clipping everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        return Image.fromarray((array * (255.0 / peak)).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")
