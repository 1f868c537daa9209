"""triton_vlm.client: image encoding, the short import path, error translation, an unreachable server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from triton_vlm._protocol.errors import translate
from triton_vlm.client import TritonVLMClient, encode_image
from triton_vlm.errors import (
    ConnectionLostError,
    GenerationError,
    InvalidInputError,
    ModelUnavailableError,
    ServerUnreachableError,
    TritonVLMError,
    UnknownModelError,
)
from triton_vlm.images import decode_image

from .helpers import BIG, SAMPLE_IMAGE, free_port, image_bytes, rgb_array


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data, max_bytes=BIG, max_pixels=BIG))


# -- encode_image ---------------------------------------------------------------------------------------------------
def test_path_and_str_give_file_bytes() -> None:
    raw = SAMPLE_IMAGE.read_bytes()
    assert encode_image(SAMPLE_IMAGE) == raw
    assert encode_image(str(SAMPLE_IMAGE)) == raw


def test_bytes_and_bytearray_pass_through() -> None:
    data = image_bytes(6, 4, fmt="JPEG")
    assert encode_image(data) == data
    out = encode_image(bytearray(data))
    assert out == data and type(out) is bytes


def test_pil_image_becomes_lossless_png() -> None:
    array = rgb_array(9, 7, seed=2)
    data = encode_image(Image.fromarray(array))
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(pixels(data), array)


def test_rgba_pil_image_keeps_alpha_in_png() -> None:
    image = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    data = encode_image(image)
    assert Image.open(io.BytesIO(data)).mode == "RGBA"


def test_hwc_uint8_array_is_encoded_as_pixels() -> None:
    array = rgb_array(11, 5, seed=9)
    data = encode_image(array)
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(pixels(data), array)


def test_hw_uint8_array_is_greyscale() -> None:
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    out = pixels(encode_image(grey))
    assert out.shape == (4, 5, 3) and np.array_equal(out[..., 1], grey)


def test_1d_uint8_array_is_file_bytes() -> None:
    data = image_bytes(5, 5, fmt="JPEG")
    assert encode_image(np.frombuffer(data, dtype=np.uint8)) == data


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file") as info:
        encode_image(tmp_path / "missing.png")
    assert "missing.png" in str(info.value) and info.value.param == "image"
    with pytest.raises(InvalidInputError, match="no such file"):
        encode_image(str(tmp_path))  # a directory is not a file


@pytest.mark.parametrize("array", [np.zeros((4, 4, 3), np.float32), np.zeros(10, np.float64),
                                   np.zeros((2, 2, 2, 3), np.uint8), np.zeros((4, 4), np.int16)])
def test_bad_arrays(array: np.ndarray) -> None:
    with pytest.raises(InvalidInputError, match="an array must be HxW or HxWxC uint8") as info:
        encode_image(array)
    assert str(array.dtype) in str(info.value)


@pytest.mark.parametrize("value", [42, None, ["a"], 3.5])
def test_unsupported_types(value: object) -> None:
    with pytest.raises(InvalidInputError, match="unsupported type"):
        encode_image(value)  # type: ignore[arg-type]


# -- import path and construction -------------------------------------------------------------------------------
def test_short_import_path() -> None:
    import triton_client
    from triton_client import TritonVLMClient as Short

    assert Short is TritonVLMClient
    assert triton_client.encode_image is encode_image
    assert triton_client.ServerUnreachableError is ServerUnreachableError
    assert issubclass(triton_client.InvalidInputError, triton_client.TritonVLMError)


@pytest.mark.parametrize("url, expected", [("localhost:8000", "localhost:8000"), ("http://h:1/", "h:1"),
                                           ("grpc://h:2", "h:2")])
def test_url_normalisation(url: str, expected: str) -> None:
    assert TritonVLMClient(url).url == expected


def test_bad_protocol() -> None:
    with pytest.raises(ValueError, match="protocol must be 'http' or 'grpc'"):
        TritonVLMClient("localhost:8000", protocol="ftp")  # type: ignore[arg-type]


# -- unreachable server ---------------------------------------------------------------------------------------------
@pytest.fixture
def closed_url() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_infer_against_closed_port(closed_url: str, protocol: str) -> None:
    with TritonVLMClient(closed_url, protocol=protocol, timeout=5) as client:  # type: ignore[arg-type]
        with pytest.raises(ServerUnreachableError, match=f"cannot reach triton-vlm server at {closed_url}"):
            client.infer("llava", image_bytes(4, 4), "hi", max_tokens=2, temperature=0.5, top_p=0.9, seed=1)
        with pytest.raises(ServerUnreachableError):
            client.list_models()
        assert client.is_ready() is False
        assert client.is_ready("llava") is False


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_wait_until_ready_times_out(closed_url: str, protocol: str) -> None:
    client = TritonVLMClient(closed_url, protocol=protocol, timeout=5)  # type: ignore[arg-type]
    with pytest.raises(ServerUnreachableError, match=f"{closed_url} not ready after 1s"):
        client.wait_until_ready(timeout=1)
    with pytest.raises(ServerUnreachableError, match="model 'llava' on"):
        client.wait_until_ready(timeout=0.3, model_name="llava")
    client.close()
    client.close()  # idempotent


def test_bad_image_fails_before_any_network(closed_url: str) -> None:
    with pytest.raises(InvalidInputError, match="no such file"):
        TritonVLMClient(closed_url).infer("llava", "/no/such/image.png", "hi")


def test_chat_fields_carry_the_messages_as_json_and_each_image_encoded() -> None:
    from triton_vlm.client.client import chat_fields

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Chat? 🐱"}]}]
    pil = Image.new("RGB", (3, 2), (9, 8, 7))
    fields = chat_fields(messages, [SAMPLE_IMAGE, pil], max_tokens=4, ignore_eos=False)
    assert json.loads(fields.messages or "") == messages and "🐱" in (fields.messages or "")
    assert fields.images == (SAMPLE_IMAGE.read_bytes(), encode_image(pil))
    assert (fields.image, fields.prompt, fields.max_tokens, fields.ignore_eos) == (None, None, 4, None)
    assert chat_fields('[{"role": "user", "content": "Hi"}]').messages == '[{"role": "user", "content": "Hi"}]'
    with pytest.raises(InvalidInputError, match="no such file"):  # before any network, as infer
        TritonVLMClient("127.0.0.1:1").chat("llava", messages, images=["/no/such/image.png"])


# -- server error translation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("message, status, expected", [
    ("Request for unknown model: 'nope' is not found", "400", UnknownModelError),
    ("failed to load 'nope', model not found", "StatusCode.NOT_FOUND", UnknownModelError),
    ("image: empty; send the bytes of a PNG or JPEG file", "400", InvalidInputError),
    ("prompt: empty", "StatusCode.INVALID_ARGUMENT", InvalidInputError),
    ("model 'llava': cannot load weights", "503", ModelUnavailableError),
    ("model 'llava': cannot load weights", "StatusCode.UNAVAILABLE", ModelUnavailableError),
    ("failed to connect to all addresses; Connection refused", "StatusCode.UNAVAILABLE", ServerUnreachableError),
    ("Connection refused", None, ServerUnreachableError),
    ("Socket closed", "StatusCode.UNAVAILABLE", ConnectionLostError),
    ("Connection reset by peer", "StatusCode.UNAVAILABLE", ConnectionLostError),
    ("something odd", "404", UnknownModelError),
    ("generation failed: RuntimeError", "500", GenerationError),
    ("generation failed", "StatusCode.INTERNAL", GenerationError),
])
def test_translate(message: str, status: str | None, expected: type[TritonVLMError]) -> None:
    error = translate(InferenceServerException(message, status=status), model="nope", url="h:1")
    assert type(error) is expected
    assert message in str(error)
    assert error.model == "nope" and error.code == expected.triton_code and error.param is None
