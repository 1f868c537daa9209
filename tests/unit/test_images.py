"""triton_vlm.images: decoding request bytes into an upright RGB image, with limits and clear errors."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from triton_vlm.errors import InvalidInputError
from triton_vlm.images import ACCEPTED_FORMATS, decode_image, image_bytes_from_tensor

from .helpers import (
    BIG,
    SAMPLE_IMAGE,
    encode,
    image_bytes,
    multi_frame,
    png_header_only,
    rgb_array,
    truncated_animated_gif,
)


def decode(data: bytes, max_bytes: int = BIG, max_pixels: int = BIG) -> Image.Image:
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)


# -- accepted inputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_round_trip_exactly(fmt: str) -> None:
    array = rgb_array(23, 17, seed=3)
    out = decode(encode(Image.fromarray(array), fmt))
    assert out.mode == "RGB" and out.size == (23, 17)
    assert np.array_equal(np.asarray(out), array)


def test_lossless_webp_round_trips() -> None:
    array = rgb_array(16, 12, seed=4)
    out = decode(encode(Image.fromarray(array), "WEBP", lossless=True))
    assert np.array_equal(np.asarray(out), array)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_decode_close(fmt: str) -> None:
    flat = np.zeros((32, 48, 3), np.uint8)
    flat[:] = (200, 40, 90)
    out = decode(encode(Image.fromarray(flat), fmt, quality=95))
    assert out.mode == "RGB" and out.size == (48, 32)
    assert np.abs(np.asarray(out).astype(int) - flat).max() <= 8


def test_single_frame_gif_is_accepted() -> None:
    out = decode(encode(Image.new("RGB", (10, 6), (255, 0, 0)), "GIF"))
    assert out.mode == "RGB" and out.size == (10, 6)
    assert out.getpixel((5, 3)) == (255, 0, 0)


def test_sample_image() -> None:
    out = decode(SAMPLE_IMAGE.read_bytes())
    assert out.mode == "RGB" and out.size == (640, 480)


def test_grayscale_becomes_rgb() -> None:
    grey = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    out = np.asarray(decode(encode(Image.fromarray(grey, mode="L"))))
    assert out.shape == (5, 5, 3)
    for channel in range(3):
        assert np.array_equal(out[..., channel], grey)


def test_bilevel_becomes_rgb() -> None:
    image = Image.new("1", (4, 4), 0)
    image.putpixel((1, 1), 1)
    out = decode(encode(image))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)


def test_palette_becomes_rgb() -> None:
    image = Image.new("P", (4, 4))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((2, 3), 1)
    out = decode(encode(image))
    assert out.mode == "RGB"
    assert out.getpixel((2, 3)) == (10, 200, 30) and out.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_is_flattened_on_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0  # index 0 (black) is transparent
    out = decode(encode(image, transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent black shows as white
    assert out.getpixel((1, 1)) == (10, 200, 30)


def test_rgba_is_flattened_on_white() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (0, 0, 0)
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[1, 1] = (200, 10, 10, 255)  # opaque -> unchanged
    rgba[2, 2] = (0, 0, 0, 128)  # half transparent black -> mid grey
    out = decode(encode(Image.fromarray(rgba, mode="RGBA")))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (200, 10, 10)
    assert all(120 <= c <= 135 for c in out.getpixel((2, 2)))


def test_grey_with_alpha_is_flattened_on_white() -> None:
    la = Image.new("LA", (3, 3), (0, 0))
    la.putpixel((1, 1), (40, 255))
    out = decode(encode(la))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (40, 40, 40)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode(data)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r >= 240 and g <= 15 and b <= 15


def test_16_bit_png_is_scaled_not_clipped() -> None:
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(4, 64)  # 0 .. 65535
    data = encode(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(decode(data))
    assert out.shape == (4, 64, 3) and out.dtype == np.uint8
    expected = np.arange(256, dtype=np.uint8).reshape(4, 64)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1  # a ramp, not everything-above-255 = white
    assert len(np.unique(out)) > 200


def test_dark_16_bit_png_stays_dark() -> None:
    dark = np.full((4, 4), 1000, np.uint16)
    out = np.asarray(decode(encode(Image.fromarray(dark))))
    assert out.max() <= 10  # 1000/65535 of full scale is about 4/255
    assert np.all(out == 4)  # round(1000 / 65535 * 255)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_scales_by_the_16_bit_range(fmt: str) -> None:
    values = np.array([[0, 257, 1000, 32768, 65535]], np.uint16)
    out = np.asarray(decode(encode(Image.fromarray(values), fmt)))[..., 0]
    assert out.tolist() == [[0, 1, 4, 128, 255]]


def test_32_bit_tiff_scales_by_its_signed_32_bit_range() -> None:
    values = np.array([[-5, 100, 2**30, 2**31 - 1]], np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    out = np.asarray(decode(data))[..., 0]
    assert out.tolist() == [[0, 0, 128, 255]]  # negative clipped to black; 100/(2**31-1) is black too


def test_int_grey_without_a_known_depth_is_clipped_to_8_bits() -> None:
    from triton_vlm.images import _sample_bits, _to_rgb

    image = Image.fromarray(np.array([[-3, 0, 100, 255, 300, 70000]], np.int32))
    assert image.mode == "I" and _sample_bits(image) is None
    assert np.asarray(_to_rgb(image))[..., 0].tolist() == [[0, 0, 100, 255, 255, 255]]


@pytest.mark.parametrize("orientation, size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int]) -> None:
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)  # left half red, right half blue
    array[:, 20:] = (0, 0, 255)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    out = decode(encode(image, "JPEG", exif=exif, quality=95))
    assert out.size == size
    if orientation == 6:  # rotated 90 degrees clockwise: the left (red) half ends up on top
        r, _, b = out.getpixel((10, 5))
        assert r > 200 and b < 60


def test_accepted_formats() -> None:
    assert {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"} == ACCEPTED_FORMATS


# -- rejected inputs ----------------------------------------------------------------------------------------
def assert_rejected(data: bytes, *fragments: str, **limits: int) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as info:
        decode(data, **limits)
    message = str(info.value)
    assert message.startswith("image:"), message
    assert info.value.param == "image" and info.value.code == "INVALID_ARG"
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_empty_bytes() -> None:
    assert_rejected(b"", "empty")


def test_random_garbage() -> None:
    garbage = np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    assert_rejected(garbage, "not a recognised image file", "3000 bytes")


def test_text_is_not_an_image() -> None:
    assert_rejected(b"hello, this is not an image", "not a recognised image file", "b'hello, t'")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(fmt: str) -> None:
    data = image_bytes(64, 48, seed=1, fmt=fmt)
    assert_rejected(data[: len(data) // 2], "corrupt or truncated", fmt)


def test_header_only_png() -> None:
    data = image_bytes(8, 8)
    assert_rejected(data[:40])


def test_over_max_bytes() -> None:
    data = image_bytes(8, 8)
    assert_rejected(data, f"{len(data)} bytes is over the limit of {len(data) - 1} bytes", max_bytes=len(data) - 1)
    assert decode(data, max_bytes=len(data)).size == (8, 8)  # exactly at the limit is fine


def test_over_max_pixels() -> None:
    data = image_bytes(20, 10)
    assert_rejected(data, "20x10 pixels is over the limit of 199 pixels", max_pixels=199)
    assert decode(data, max_pixels=200).size == (20, 10)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    """A few hundred bytes claiming 50000 x 50000 pixels: refused before any pixel is decoded."""
    bomb = png_header_only(50_000, 50_000)
    assert len(bomb) < 300
    assert_rejected(bomb, "too many pixels", max_pixels=40_000_000)


def test_moderate_bomb_between_pil_warning_and_error_limits() -> None:
    # 10000 x 10000 = 1e8 pixels: above PIL's warning threshold (~8.9e7), below its error threshold.
    assert_rejected(png_header_only(10_000, 10_000), "too many pixels")


def test_huge_dimensions_under_pil_limits_hit_our_limit() -> None:
    assert_rejected(png_header_only(8000, 8000), "8000x8000 pixels is over the limit of 40000000 pixels",
                    max_pixels=40_000_000)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP", "PNG"])
def test_multi_frame_files_are_refused(fmt: str) -> None:
    assert_rejected(multi_frame(fmt, frames=3), "3 frames", "single image")


@pytest.mark.parametrize("fmt", ["ICO", "EPS", "TGA", "PPM", "PCX"])
def test_formats_outside_the_accepted_list(fmt: str) -> None:
    data = encode(Image.new("RGB", (16, 16), "red"), fmt)
    assert_rejected(data, f"format {fmt} is not accepted")


def test_pdf_is_refused() -> None:
    data = encode(Image.new("RGB", (16, 16), "red"), "PDF")
    assert_rejected(data, "not a recognised image file", "%PDF")


# Truncated uploads of animated GIFs / multi-page TIFFs: PIL fails while counting frames.
CORRUPT_MULTI_FRAME = {
    "gif-truncated-in-second-frame": truncated_animated_gif,
    "tiff-truncated-in-half": lambda: multi_frame("TIFF")[: len(multi_frame("TIFF")) // 2],
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(CORRUPT_MULTI_FRAME))
def test_corrupt_multi_frame_files_are_invalid_input(name: str) -> None:
    data = CORRUPT_MULTI_FRAME[name]()
    with pytest.raises(InvalidInputError, match=r"^image: corrupt or truncated (GIF|TIFF) data") as info:
        decode(data)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no PIL traceback chained in


@pytest.mark.parametrize("exc", [IndexError("list index out of range"), struct.error("unpack requires"),
                                 TypeError("bad"), KeyError("x")])
def test_any_pil_failure_after_open_is_invalid_input(exc: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever PIL raises while checking or decoding the pixels, the caller sees InvalidInputError."""
    import triton_vlm.images as images

    def boom(image: Image.Image, bits: object = None) -> Image.Image:
        raise exc

    monkeypatch.setattr(images, "_to_rgb", boom)
    with pytest.raises(InvalidInputError, match="^image: "):
        decode(image_bytes(8, 8))
    monkeypatch.setattr(images, "_sample_bits", boom)
    with pytest.raises(InvalidInputError, match="^image: "):
        decode(image_bytes(8, 8))


# -- properties -----------------------------------------------------------------------------------------------
@given(st.binary(max_size=2048))
@example(b"\x89PNG\r\n\x1a\n")
@example(b"\xff\xd8\xff\xe0")
@example(b"GIF89a")
@example(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
def test_arbitrary_bytes_only_raise_invalid_input(data: bytes) -> None:
    try:
        out = decode(data, max_bytes=4096, max_pixels=10**6)
    except InvalidInputError as exc:
        assert str(exc).startswith("image:")
    else:
        assert out.mode == "RGB" and out.width >= 1 and out.height >= 1


PNG_SEED = image_bytes(12, 9, seed=5)
JPEG_SEED = image_bytes(12, 9, seed=5, fmt="JPEG")


@given(st.sampled_from([PNG_SEED, JPEG_SEED]), st.data())
def test_mutated_single_frame_files_only_raise_invalid_input(seed: bytes, data: st.DataObject) -> None:
    """Valid PNG/JPEG files with bytes flipped or cut off: decoded or refused, never another exception."""
    mutated = bytearray(seed)
    for _ in range(data.draw(st.integers(0, 6))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    mutated = mutated[: data.draw(st.integers(1, len(mutated)))]
    try:
        out = decode(bytes(mutated), max_pixels=10**6)
    except InvalidInputError:
        return
    assert out.mode == "RGB"


@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from(["PNG", "BMP", "TIFF"]))
def test_lossless_round_trip_property(width: int, height: int, fmt: str) -> None:
    array = rgb_array(width, height, seed=width * 41 + height)
    assert np.array_equal(np.asarray(decode(encode(Image.fromarray(array), fmt))), array)


# -- image_bytes_from_tensor -----------------------------------------------------------------------------------
def test_tensor_1d_and_batched_row() -> None:
    data = image_bytes(5, 5)
    flat = np.frombuffer(data, dtype=np.uint8)
    assert image_bytes_from_tensor(flat) == data
    assert image_bytes_from_tensor(flat[None, :]) == data


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.int32, np.object_])
def test_tensor_wrong_dtype(dtype: type) -> None:
    with pytest.raises(InvalidInputError, match="expected a UINT8 tensor"):
        image_bytes_from_tensor(np.zeros(10, dtype=dtype))


def test_tensor_float_message_names_dtype() -> None:
    with pytest.raises(InvalidInputError, match="got float32"):
        image_bytes_from_tensor(np.zeros(10, dtype=np.float32))


@pytest.mark.parametrize("shape", [(2, 10), (1, 1, 10), (3, 4, 5)])
def test_tensor_wrong_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError, match=r"expected shape \[n\] or \[1, n\]") as info:
        image_bytes_from_tensor(np.zeros(shape, dtype=np.uint8))
    assert str(list(shape)) in str(info.value)
