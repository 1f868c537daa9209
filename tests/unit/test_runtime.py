"""triton_vlm.runtime.VLMRuntime: request validation, lazy thread-safe loading, per-request errors."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

import triton_vlm.runtime as runtime_module
from triton_vlm.config import ModelSettings, RequestLimits
from triton_vlm.errors import GenerationError, InvalidInputError, ModelLoadError, TritonVLMError, UnknownModelError
from triton_vlm.models.generation import GenerationOutput
from triton_vlm.runtime import VLMRuntime, as_request_error
from triton_vlm.sampling import SamplingParams

from .helpers import image_bytes

CPU = torch.device("cpu")
#: The schema's default prompt limit, in characters.
MAX_PROMPT_CHARS = RequestLimits().max_prompt_chars
IMAGE = image_bytes(32, 24, seed=1)


def fresh(family: str = "llava", **overrides: Any) -> VLMRuntime:
    return VLMRuntime(ModelSettings(model_name=f"test-{family}", family=family).with_overrides(tiny=True, **overrides),
                      CPU)


# -- make_request ------------------------------------------------------------------------------------------------
def test_make_request_defaults() -> None:
    request = fresh(default_max_tokens=17).make_request(IMAGE, "What is this?")
    assert request.prompt == "What is this?"
    assert request.params == SamplingParams(max_tokens=17, temperature=0.0, top_p=1.0, seed=None)
    assert request.image.mode == "RGB" and request.image.size == (32, 24)


def test_make_request_passes_sampling_values() -> None:
    request = fresh().make_request(IMAGE, "hi", max_tokens=5, temperature=0.7, top_p=0.9, seed=3)
    assert request.params == SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, seed=3)


def test_prompt_bytes_are_decoded_as_utf8() -> None:
    assert fresh().make_request(IMAGE, "Qu'est-ce que c'est ? 🐱".encode()).prompt == "Qu'est-ce que c'est ? 🐱"


@pytest.mark.parametrize("prompt, fragment", [
    ("", "prompt: empty"),
    ("   \n\t ", "prompt: empty"),
    (b"", "prompt: empty"),
    (b"\xff\xfe bad", "prompt: not valid UTF-8"),
    (b"ok \xc3", "prompt: not valid UTF-8"),
    ("what\x00is this", "prompt: contains a NUL character"),
    ("x" * (MAX_PROMPT_CHARS + 1), f"{MAX_PROMPT_CHARS + 1} characters is over the limit of {MAX_PROMPT_CHARS}"),
])
def test_bad_prompts(prompt: str | bytes, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        fresh().make_request(IMAGE, prompt)
    assert fragment in str(info.value) and info.value.param == "prompt"


def test_longest_prompt_is_accepted() -> None:
    assert len(fresh().make_request(IMAGE, "x" * MAX_PROMPT_CHARS).prompt) == MAX_PROMPT_CHARS


def test_prompt_limit_comes_from_settings() -> None:
    runtime = fresh(max_prompt_chars=10)
    assert runtime.make_request(IMAGE, "x" * 10).prompt == "x" * 10
    with pytest.raises(InvalidInputError, match="11 characters is over the limit of 10"):
        runtime.make_request(IMAGE, "x" * 11)


def test_invalid_utf8_message_names_the_byte() -> None:
    with pytest.raises(InvalidInputError, match="at byte 3"):
        fresh().make_request(IMAGE, b"abc\xff")


@pytest.mark.parametrize("family, prompt", [
    ("llava", "<image> what is this?"), ("llava", "look: <image>"),
    ("kosmos2", "<image> what"), ("kosmos2", "a </image> b"),
])
def test_reserved_tokens_are_refused(family: str, prompt: str) -> None:
    with pytest.raises(InvalidInputError, match="reserved token") as info:
        fresh(family).make_request(IMAGE, prompt)
    assert info.value.param == "prompt"


def test_kosmos_grounding_prefix_is_allowed() -> None:
    assert fresh("kosmos2").make_request(IMAGE, "<grounding> An image of").prompt.startswith("<grounding>")


@pytest.mark.parametrize("max_tokens", [0, -1, 1025])
def test_max_tokens_outside_limit(max_tokens: int) -> None:
    with pytest.raises(InvalidInputError, match=rf"max_tokens must be in \[1, 1024\], got {max_tokens}") as info:
        fresh().make_request(IMAGE, "hi", max_tokens=max_tokens)
    assert info.value.param == "max_tokens"


def test_max_tokens_limit_comes_from_settings() -> None:
    runtime = fresh(max_tokens_limit=8, default_max_tokens=8)
    assert runtime.make_request(IMAGE, "hi", max_tokens=8).params.max_tokens == 8
    with pytest.raises(InvalidInputError, match=r"\[1, 8\], got 9"):
        runtime.make_request(IMAGE, "hi", max_tokens=9)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"seed": -4}, "seed"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_bad_sampling_values(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment) as info:
        fresh().make_request(IMAGE, "hi", **kwargs)
    assert info.value.param == fragment


@pytest.mark.parametrize("data, fragment", [(b"", "empty"), (b"not an image at all", "not a recognised")])
def test_bad_image(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment) as info:
        fresh().make_request(data, "hi")
    assert info.value.param == "image"


def test_image_limits_come_from_settings() -> None:
    with pytest.raises(InvalidInputError, match="pixels is over the limit of 100 pixels"):
        fresh(max_image_pixels=100).make_request(IMAGE, "hi")
    with pytest.raises(InvalidInputError, match="over the limit of 10 bytes"):
        fresh(max_image_bytes=10).make_request(IMAGE, "hi")


def test_unknown_family() -> None:
    with pytest.raises(UnknownModelError, match="unknown model family 'nope'; known families: auto, kosmos2, llava"):
        fresh("nope")


# -- lazy loading ---------------------------------------------------------------------------------------------
class FakeLoader:
    """Stands in for load_model: slow, counting, and optionally failing the first ``fail`` times."""

    def __init__(self, result: Any = None, fail: int = 0, delay: float = 0.0,
                 error: Exception | None = None) -> None:
        self.calls = 0
        self.result = result if result is not None else object()
        self.fail = fail
        self.delay = delay
        self.error = error or ModelLoadError("model 'test-llava': no weights here")
        self.lock = threading.Lock()

    def __call__(self, settings: ModelSettings, device: torch.device) -> Any:
        with self.lock:
            self.calls += 1
            call = self.calls
        time.sleep(self.delay)
        if call <= self.fail:
            raise self.error
        return self.result


def test_nothing_loads_before_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = FakeLoader()
    monkeypatch.setattr(runtime_module, "load_model", loader)
    runtime = fresh()
    runtime.make_request(IMAGE, "hi")
    assert runtime.generate([]) == []
    assert loader.calls == 0 and runtime.loaded is None


def test_concurrent_first_use_loads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = FakeLoader(delay=0.3)
    monkeypatch.setattr(runtime_module, "load_model", loader)
    runtime = fresh()
    threads_n = 8
    barrier = threading.Barrier(threads_n)
    results: list[Any] = []

    def worker() -> None:
        barrier.wait()
        results.append(runtime.ensure_loaded())

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert loader.calls == 1
    assert len(results) == threads_n and all(r is loader.result for r in results)
    assert runtime.loaded is loader.result
    runtime.ensure_loaded()
    assert loader.calls == 1


def test_failed_load_errors_every_request_and_retries(monkeypatch: pytest.MonkeyPatch,
                                                      llava_runtime: VLMRuntime) -> None:
    loader = FakeLoader(result=llava_runtime.ensure_loaded(), fail=1)
    monkeypatch.setattr(runtime_module, "load_model", loader)
    runtime = fresh()
    requests = [runtime.make_request(IMAGE, p, max_tokens=3) for p in ("one", "two", "three")]
    first = runtime.generate(requests)
    assert len(first) == 3
    assert all(isinstance(r, ModelLoadError) and "no weights here" in str(r) for r in first)
    assert runtime.loaded is None and loader.calls == 1
    second = runtime.generate(requests)
    assert loader.calls == 2
    assert all(isinstance(r, GenerationOutput) for r in second)
    assert second == llava_runtime.generate(requests)


def test_failed_ensure_loaded_raises_and_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = FakeLoader(fail=2)
    monkeypatch.setattr(runtime_module, "load_model", loader)
    runtime = fresh()
    for _ in range(2):
        with pytest.raises(ModelLoadError):
            runtime.ensure_loaded()
    assert runtime.ensure_loaded() is loader.result
    assert loader.calls == 3


# -- generation with per-request errors ---------------------------------------------------------------------------
class FailingRun:
    """Wraps VLMRuntime._run: any batch containing a prompt with ``marker`` fails with ``error``."""

    def __init__(self, runtime: VLMRuntime, marker: str, error: Exception) -> None:
        self.original = runtime._run
        self.marker = marker
        self.error = error
        self.batches: list[int] = []

    def __call__(self, loaded: Any, requests: list[Any]) -> Any:
        self.batches.append(len(requests))
        if any(self.marker in r.prompt for r in requests):
            raise self.error
        return self.original(loaded, requests)


def test_batch_failure_falls_back_to_one_by_one(monkeypatch: pytest.MonkeyPatch,
                                                runtime: VLMRuntime) -> None:
    requests = [runtime.make_request(image_bytes(20 + 5 * i, 30, seed=i), p, max_tokens=4)
                for i, p in enumerate(["first", "BOOM here", "third"])]
    good = [runtime.generate([r])[0] for r in (requests[0], requests[2])]
    failing = FailingRun(runtime, "BOOM", RuntimeError("kernel exploded"))
    monkeypatch.setattr(runtime, "_run", failing)
    results = runtime.generate(requests)
    assert failing.batches == [3, 1, 1, 1]
    assert results[0] == good[0] and results[2] == good[1]
    assert isinstance(results[1], GenerationError)
    assert "RuntimeError: kernel exploded" in str(results[1])


def test_value_errors_become_invalid_input(monkeypatch: pytest.MonkeyPatch, llava_runtime: VLMRuntime) -> None:
    requests = [llava_runtime.make_request(IMAGE, p, max_tokens=2) for p in ("fine", "too long BAD")]
    failing = FailingRun(llava_runtime, "BAD", ValueError("prompt longer than the context"))
    monkeypatch.setattr(llava_runtime, "_run", failing)
    ok, bad = llava_runtime.generate(requests)
    assert isinstance(ok, GenerationOutput) and len(ok.token_ids) == 2
    assert isinstance(bad, InvalidInputError)
    assert "request rejected by the model's processor: prompt longer than the context" in str(bad)


def test_single_request_failure_is_not_retried(monkeypatch: pytest.MonkeyPatch, llava_runtime: VLMRuntime) -> None:
    failing = FailingRun(llava_runtime, "BOOM", RuntimeError("nope"))
    monkeypatch.setattr(llava_runtime, "_run", failing)
    (result,) = llava_runtime.generate([llava_runtime.make_request(IMAGE, "BOOM")])
    assert isinstance(result, GenerationError) and failing.batches == [1]


def test_project_errors_pass_through_unchanged(monkeypatch: pytest.MonkeyPatch,
                                              llava_runtime: VLMRuntime) -> None:
    error = InvalidInputError("prompt: too long for the model")
    monkeypatch.setattr(llava_runtime, "_run", FailingRun(llava_runtime, "X", error))
    (result,) = llava_runtime.generate([llava_runtime.make_request(IMAGE, "X")])
    assert result is error


def test_every_request_fails_when_all_fail(monkeypatch: pytest.MonkeyPatch, llava_runtime: VLMRuntime) -> None:
    monkeypatch.setattr(llava_runtime, "_run", FailingRun(llava_runtime, "", RuntimeError("down")))
    results = llava_runtime.generate([llava_runtime.make_request(IMAGE, p) for p in ("a", "b")])
    assert [type(r) for r in results] == [GenerationError, GenerationError]


def test_generate_end_to_end(runtime: VLMRuntime) -> None:
    requests = [runtime.make_request(IMAGE, "What is this?", max_tokens=3),
                runtime.make_request(image_bytes(50, 20, seed=2), "Describe it.", max_tokens=5)]
    results = runtime.generate(requests)
    assert [len(r.token_ids) for r in results] == [3, 5]  # type: ignore[union-attr]
    assert all(isinstance(r, GenerationOutput) and r.finish_reason == "length" and r.prompt_tokens > 0
               for r in results)


@pytest.mark.parametrize("temperature", [1e-40, 1e-8])
def test_tiny_positive_temperature_is_answered_greedily(llava_runtime: VLMRuntime, temperature: float) -> None:
    tiny = llava_runtime.make_request(IMAGE, "hi", temperature=temperature, max_tokens=3, seed=1)
    greedy = llava_runtime.make_request(IMAGE, "hi", temperature=0.0, max_tokens=3)
    result, expected = llava_runtime.generate([tiny, greedy])
    assert isinstance(result, GenerationOutput), result
    assert result.token_ids == expected.token_ids


# -- as_request_error ----------------------------------------------------------------------------------------------
def test_as_error_mapping() -> None:
    own = ModelLoadError("x")
    assert as_request_error(own) is own
    assert isinstance(as_request_error(ValueError("v")), InvalidInputError)
    assert isinstance(as_request_error(IndexError("i")), InvalidInputError)
    oom = as_request_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert isinstance(oom, GenerationError) and "out of GPU memory" in str(oom)
    other = as_request_error(KeyError("k"))
    assert isinstance(other, GenerationError) and "KeyError" in str(other)
    assert all(isinstance(e, TritonVLMError) for e in (oom, other))


def test_make_request_passes_ignore_eos() -> None:
    assert fresh().make_request(IMAGE, "hi").params.ignore_eos is False
    request = fresh().make_request(IMAGE, "hi", max_tokens=4, ignore_eos=True)
    assert request.params == SamplingParams(max_tokens=4, ignore_eos=True)


def test_generate_honours_ignore_eos(llava_runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    (plain,) = llava_runtime.generate([llava_runtime.make_request(IMAGE, "hi", max_tokens=4)])
    family = llava_runtime.ensure_loaded().family
    monkeypatch.setattr(family, "stop_token_ids", lambda model, processor: {plain.token_ids[0]})
    stopped, ignored = llava_runtime.generate([llava_runtime.make_request(IMAGE, "hi", max_tokens=4),
                                               llava_runtime.make_request(IMAGE, "hi", max_tokens=4, ignore_eos=True)])
    assert isinstance(stopped, GenerationOutput) and stopped.finish_reason == "stop" and stopped.token_ids == ()
    assert isinstance(ignored, GenerationOutput) and ignored.finish_reason == "length"
    assert ignored.token_ids == plain.token_ids
