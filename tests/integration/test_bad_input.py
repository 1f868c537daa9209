"""Bad input through the real server: every image, prompt and sampling case of the reliability issue, over HTTP
and gRPC. Each is answered (odd but valid inputs) or refused with a clear INVALID_ARGUMENT naming the field; the
server keeps serving, and one bad request in a dynamic batch fails alone."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from tests.integration.conftest import RunningServer
from tests.unit.helpers import encode, image_bytes, multi_frame, png_header_only, rgb_array

from triton_client import TritonVLMClient
from triton_vlm.config import RequestLimits
from triton_vlm.errors import InvalidInputError

pytestmark = pytest.mark.integration

OK = None  # expected outcome: an answer


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _exif_rotated() -> bytes:
    image = Image.fromarray(rgb_array(40, 20, seed=3))
    exif = image.getexif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif)


def _sixteen_bit() -> bytes:
    return encode(Image.fromarray((np.arange(1024, dtype=np.uint16) * 64).reshape(32, 32)))


def _palette() -> bytes:
    return encode(Image.fromarray(rgb_array(16, 16, seed=2)).convert("P"))


def _rgba() -> bytes:
    rgba = np.dstack([rgb_array(16, 16, seed=4), np.full((16, 16), 128, np.uint8)])
    return encode(Image.fromarray(rgba, mode="RGBA"))


# name -> (image bytes, expected error fragment or OK)
IMAGES: dict[str, tuple[Callable[[], bytes], str | None]] = {
    "not-an-image": (lambda: b"this is plain text, not an image", "not a recognised image file"),
    "empty": (lambda: b"", "image: empty"),
    "truncated-png": (lambda: image_bytes(64, 48, seed=1)[:300], "corrupt or truncated PNG"),
    "truncated-jpeg": (lambda: _half(image_bytes(64, 48, seed=1, fmt="JPEG")), "corrupt or truncated JPEG"),
    "jpeg-header-only": (lambda: image_bytes(64, 48, seed=1, fmt="JPEG")[:400], "image: cannot open"),
    "decompression-bomb": (lambda: png_header_only(50_000, 50_000), "too many pixels"),
    "huge-under-pil-limit": (lambda: png_header_only(8000, 8000), "over the limit of 40000000 pixels"),
    "animated-gif": (lambda: multi_frame("GIF", frames=3), "3 frames"),
    "multi-page-tiff": (lambda: multi_frame("TIFF", frames=2), "2 frames"),
    "pdf": (lambda: encode(Image.new("RGB", (8, 8)), "PDF"), "not a recognised image file"),
    "ico": (lambda: encode(Image.new("RGB", (16, 16)), "ICO"), "format ICO is not accepted"),
    "1x1": (lambda: image_bytes(1, 1), OK),
    "grayscale": (lambda: encode(Image.new("L", (20, 12), 90)), OK),
    "bilevel": (lambda: encode(Image.new("1", (9, 9), 1)), OK),
    "palette": (_palette, OK),
    "rgba": (_rgba, OK),
    "cmyk-jpeg": (lambda: encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), OK),
    "16-bit-png": (_sixteen_bit, OK),
    "exif-rotated-jpeg": (_exif_rotated, OK),
    "webp": (lambda: image_bytes(20, 20, fmt="WEBP"), OK),
    "bmp": (lambda: image_bytes(7, 5, fmt="BMP"), OK),
    "tall-thin": (lambda: image_bytes(1, 60), OK),
    "elongated-strip": (lambda: image_bytes(1, 500), "more elongated than the limit of 100:1"),
}

# name -> (prompt, extra request values, expected error fragment or OK)
PROMPTS: dict[str, tuple[str, dict, str | None]] = {
    "empty": ("", {}, "prompt: empty"),
    "whitespace": (" \n\t ", {}, "prompt: empty"),
    "over-the-character-limit": ("x" * (RequestLimits().max_prompt_chars + 1), {}, "over the limit of"),
    "beyond-the-context": ("tell me more " * 1000, {}, "exceed the model's context of 1024 tokens"),
    "answer-beyond-the-context": ("What is this?", {"max_tokens": 1024}, "exceed the model's context"),
    "nul": ("what\x00is this", {}, "NUL"),
    "control-characters": ("\x07\x1b[31mwhat\x7f is\x0c this?\r", {}, OK),
    "unicode": ("Qu'est-ce que c'est ? 🐱 これは何ですか", {}, OK),
    "image-token": ("<image> what is this?", {}, "reserved token '<image>'"),
    "eos-token": ("stop here </s> and go on", {}, "reserved token '</s>'"),
    "bos-token": ("<s> again", {}, "reserved token '<s>'"),
    "lookalike-tokens": ("< image > <imag e> &lt;image&gt;", {}, OK),
    "max-tokens-0": ("hi", {"max_tokens": 0}, "max_tokens must be in [1, 1024], got 0"),
    "max-tokens-negative": ("hi", {"max_tokens": -5}, "max_tokens must be in [1, 1024], got -5"),
    "max-tokens-huge": ("hi", {"max_tokens": 2**31 - 1}, "max_tokens must be in [1, 1024]"),
    "temperature-negative": ("hi", {"temperature": -0.5}, "temperature must be in [0, 100]"),
    "temperature-nan": ("hi", {"temperature": float("nan")}, "temperature must be in [0, 100]"),
    "temperature-inf": ("hi", {"temperature": float("inf")}, "temperature must be in [0, 100]"),
    "top-p-0": ("hi", {"top_p": 0.0}, "top_p must be in (0, 1]"),
    "top-p-above-1": ("hi", {"top_p": 1.5}, "top_p must be in (0, 1]"),
    "seed-negative": ("hi", {"seed": -1}, "seed must be in [0, 2**63-1]"),
    "sampling-in-range": ("hi", {"temperature": 0.7, "top_p": 0.5, "seed": 2**63 - 1}, OK),
    # Triton itself refuses an input the model does not declare.
    "task-on-a-model-without-tasks": ("hi", {"task": "detect"}, "unexpected inference input 'task'"),
}


#: The request field each refused prompt case names (``InvalidInputError.param``); Triton's own refusals name none.
PARAMS = {"max-tokens-0": "max_tokens", "max-tokens-negative": "max_tokens", "max-tokens-huge": "max_tokens",
          "temperature-negative": "temperature", "temperature-nan": "temperature", "temperature-inf": "temperature",
          "top-p-0": "top_p", "top-p-above-1": "top_p", "seed-negative": "seed", "task-on-a-model-without-tasks": None}


def _check(call: Callable[[], str], expected: str | None, param: str | None = None) -> None:
    if expected is OK:
        assert isinstance(call(), str)
        return
    with pytest.raises(InvalidInputError) as info:
        call()
    assert expected in str(info.value)
    # Structure, not text: the code, the field at fault and the model travel beside a clean message.
    assert (info.value.code, info.value.param, info.value.model) == ("INVALID_ARG", param, "llava")
    assert not str(info.value).startswith("[")


@pytest.fixture(scope="module", params=["http", "grpc"])
def client(request: pytest.FixtureRequest, triton: RunningServer) -> Iterator[TritonVLMClient]:
    url = triton.http_url if request.param == "http" else triton.grpc_url
    client = TritonVLMClient(url, protocol=request.param)
    yield client
    client.close()


@pytest.mark.parametrize("case", sorted(IMAGES))
def test_images(client: TritonVLMClient, case: str) -> None:
    make, expected = IMAGES[case]
    _check(lambda: client.infer("llava", make(), "What is this?", max_tokens=1), expected, "image")


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_prompts_and_sampling(client: TritonVLMClient, case: str, sample_image_bytes: bytes) -> None:
    prompt, extra, expected = PROMPTS[case]
    extra = {"max_tokens": 1, **extra}
    _check(lambda: client.infer("llava", sample_image_bytes, prompt, **extra), expected, PARAMS.get(case, "prompt"))


@pytest.mark.parametrize("model, prompt, fragment", [
    ("kosmos2", "<grounding> An </s> image of", "reserved token '</s>'"),
    ("kosmos2", "An image of <mask>", "reserved token '<mask>'"),
    ("moondream2", "What is <|endoftext|> this?", "reserved token"),
    ("moondream2", "word " * 3000, "context"),
    ("kosmos2", "An image of " * 700, "exceed the model's context"),
])
def test_special_tokens_and_context_of_the_other_families(triton: RunningServer, sample_image_bytes: bytes,
                                                          model: str, prompt: str, fragment: str) -> None:
    with TritonVLMClient(triton.http_url) as client:
        with pytest.raises(InvalidInputError) as info:
            client.infer(model, sample_image_bytes, prompt, max_tokens=4)
        assert fragment in str(info.value)
        answer = client.infer(model, sample_image_bytes, "<grounding> An image of" if model == "kosmos2"
                              else "What is this?", max_tokens=2)
        assert isinstance(answer, str)


# -- requests a client library would not build: raw tensors --------------------------------------------------------
def _raw(triton: RunningServer, inputs: list[tuple[str, np.ndarray, str]], model: str = "llava") -> Exception | None:
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(triton.http_url)
    tensors = []
    for name, array, dtype in inputs:
        tensor = http.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    try:
        client.infer(model, tensors)
    except InferenceServerException as exc:
        return exc
    finally:
        client.close()
    return None


def _prompt(value: bytes = b"What is this?") -> tuple[str, np.ndarray, str]:
    return ("prompt", np.array([[value]], dtype=np.object_), "BYTES")


def _image(data: bytes) -> tuple[str, np.ndarray, str]:
    return ("image", np.frombuffer(data, dtype=np.uint8)[None, :], "UINT8")


@pytest.mark.parametrize("case, inputs, fragment", [
    ("invalid-utf8", lambda img: [_image(img), _prompt(b"caf\xe9 \xff")], "prompt: not valid UTF-8"),
    ("image-as-fp32", lambda img: [("image", np.zeros((1, 16), np.float32), "FP32"), _prompt()],
     "data-type is 'FP32', but model 'llava' expects 'UINT8'"),
    ("image-as-3d", lambda img: [("image", np.zeros((1, 2, 16), np.uint8), "UINT8"), _prompt()],
     "unexpected shape"),
    ("prompt-as-int", lambda img: [_image(img), ("prompt", np.zeros((1, 1), np.int32), "INT32")],
     "expects 'BYTES'"),
    ("missing-prompt", lambda img: [_image(img)], "prompt"),
    ("max-tokens-as-float", lambda img: [_image(img), _prompt(), ("max_tokens", np.ones((1, 1), np.float32), "FP32")],
     "expects 'INT32'"),
    ("two-prompts", lambda img: [_image(img), ("prompt", np.array([[b"a", b"b"]], dtype=np.object_), "BYTES")],
     "unexpected shape"),
    ("invalid-utf8-task", lambda img: [_image(img), _prompt(), ("task", np.array([[b"\xff"]], dtype=np.object_),
                                                                 "BYTES")], "task: not valid UTF-8"),
])
def test_malformed_tensors_are_invalid_argument(triton: RunningServer, sample_image_bytes: bytes, case: str,
                                                inputs: Callable, fragment: str) -> None:
    model = "moondream2" if case == "invalid-utf8-task" else "llava"
    error = _raw(triton, inputs(sample_image_bytes), model)
    assert error is not None, f"{case} was accepted"
    assert error.status() == "400", (case, error.status(), error.message())
    assert fragment in error.message(), error.message()


def test_a_batch_of_mixed_bad_requests_answers_each_alone(triton: RunningServer, sample_image_bytes: bytes) -> None:
    """Bad requests of every kind, concurrent with good ones so the dynamic batcher mixes them."""
    cases = [(image_bytes(20 + i, 20), "What is this?", {}, OK) for i in range(6)]
    cases += [(b"garbage", "What is this?", {}, "not a recognised image"),
              (sample_image_bytes, "", {}, "prompt: empty"),
              (sample_image_bytes, "tell me more " * 1000, {}, "context"),
              (sample_image_bytes, "<image>", {}, "reserved token"),
              (png_header_only(50_000, 50_000), "hi", {}, "too many pixels"),
              (sample_image_bytes, "hi", {"top_p": 2.0}, "top_p")]
    client = TritonVLMClient(triton.http_url)

    def call(case: tuple) -> str | Exception:
        image, prompt, extra, _ = case
        try:
            return client.infer("llava", image, prompt, max_tokens=3, **extra)
        except Exception as exc:  # noqa: BLE001 - inspected below
            return exc

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(call, cases * 2))
    client.close()
    for (_, _, _, expected), result in zip(cases * 2, results, strict=True):
        if expected is OK:
            assert isinstance(result, str), result
        else:
            assert isinstance(result, InvalidInputError) and expected in str(result), result
    # The good answers are the same as when each is asked alone.
    with TritonVLMClient(triton.http_url) as client:
        assert results[0] == client.infer("llava", cases[0][0], "What is this?", max_tokens=3)


def test_the_server_is_still_ready(triton: RunningServer, sample_image_bytes: bytes) -> None:
    with TritonVLMClient(triton.http_url) as client:
        assert client.is_ready() and client.is_ready("llava")
        assert client.infer("llava", io.BytesIO(sample_image_bytes).getvalue(), "What is this?", max_tokens=2)
