"""``TritonVLMClient``: send an image and a prompt to a served model, get text back.

Errors come back as the project's exception tree (:mod:`triton_vlm.errors`): a bad image is an
:class:`InvalidInputError`, an unknown model an :class:`UnknownModelError`, a server that is down a
:class:`ServerUnreachableError`.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from PIL import Image

from triton_vlm.errors import (GenerationError, InvalidInputError, ModelUnavailableError, ServerUnreachableError,
                               TritonVLMError, UnknownModelError)

ImageLike = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]
Protocol = Literal["http", "grpc"]


@dataclass(frozen=True)
class StreamPiece:
    """One streamed response: new text, tokens generated so far, and the finish reason on the last one."""

    text: str
    generated_tokens: int
    prompt_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class InferenceResult:
    """Everything a served model returns for one request."""

    text: str
    generated_tokens: int
    prompt_tokens: int
    finish_reason: str
    latency_s: float


def encode_image(image: ImageLike) -> bytes:
    """File bytes for any accepted image form: a path, encoded bytes, a PIL image, or an HxW[xC] uint8 array.

    A 1-D uint8 array is taken as already-encoded file bytes.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InvalidInputError(f"image: no such file {str(path)!r}")
        return path.read_bytes()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 1 and image.dtype == np.uint8:
            return image.tobytes()
        if image.ndim in (2, 3) and image.dtype == np.uint8:
            image = Image.fromarray(image)
        else:
            raise InvalidInputError(
                f"image: an array must be HxW or HxWxC uint8 pixels (or 1-D file bytes), got "
                f"{image.dtype} {list(image.shape)}")
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise InvalidInputError(f"image: unsupported type {type(image).__name__}")


class TritonVLMClient:
    """A client for one triton-vlm server. Thread-safe: each thread gets its own connection.

    >>> client = TritonVLMClient(url="localhost:8000")
    >>> client.infer(model_name="llava", image="test_images/sample_image.jpg", prompt="What is this?")
    """

    def __init__(self, url: str = "localhost:8000", *, protocol: Protocol = "http",
                 timeout: float = 300.0, grpc_url: str | None = None) -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', not {protocol!r}")
        self.url = url.removeprefix("http://").removeprefix("grpc://").rstrip("/")
        self.protocol: Protocol = protocol
        #: Where :meth:`stream` connects (token streaming is gRPC); default: this host, port 8001.
        self.grpc_url = grpc_url or (self.url if protocol == "grpc" else self.url.rsplit(":", 1)[0] + ":8001")
        self.timeout = timeout
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()

    # -- inference ----------------------------------------------------------------------------------------
    def infer(self, model_name: str, image: ImageLike, prompt: str, *, max_tokens: int | None = None,
              temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
              task: str | None = None, ignore_eos: bool = False) -> str:
        """The generated text for ``prompt`` about ``image``.

        ``task`` picks a skill of models that have several (moondream2: ``caption[:short|normal|long]``,
        ``query``, ``detect``, ``point``); leave it out for the others.
        """
        return self.infer_result(model_name, image, prompt, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, task=task, ignore_eos=ignore_eos).text

    def infer_result(self, model_name: str, image: ImageLike, prompt: str, *, max_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     seed: int | None = None, task: str | None = None,
                     ignore_eos: bool = False) -> InferenceResult:
        """Like :meth:`infer`, with token counts, finish reason and latency. ``ignore_eos`` generates exactly
        ``max_tokens`` tokens (benchmarks)."""
        module = self._module()
        data = np.frombuffer(encode_image(image), dtype=np.uint8)[None, :]
        inputs = self._inputs(module, data, prompt, max_tokens, temperature, top_p, seed)
        if ignore_eos:
            inputs.append(self._tensor(module, "ignore_eos", np.array([[True]], dtype=np.bool_), "BOOL"))
        if task is not None:
            inputs.append(self._tensor(module, "task", np.array([[task.encode("utf-8")]], dtype=np.object_),
                                       "BYTES"))
        outputs = [module.InferRequestedOutput(n) for n in
                   ("generated_text", "generated_tokens", "prompt_tokens", "finish_reason")]
        started = time.perf_counter()
        result = self._call(lambda c: c.infer(model_name, inputs, outputs=outputs, **self._timeout_kwargs()),
                            model_name)
        latency = time.perf_counter() - started
        return InferenceResult(
            text=result.as_numpy("generated_text").reshape(-1)[0].decode("utf-8"),
            generated_tokens=int(result.as_numpy("generated_tokens").reshape(-1)[0]),
            prompt_tokens=int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
            finish_reason=result.as_numpy("finish_reason").reshape(-1)[0].decode("utf-8"),
            latency_s=latency,
        )

    def stream(self, model_name: str, image: ImageLike, prompt: str, *, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
               ignore_eos: bool = False) -> Iterator[str]:
        """Yield the answer piece by piece as the engine generates it (gRPC streaming to ``<model>_stream``).

        The pieces concatenate to the text :meth:`infer` returns. Leaving the loop early cancels the request.
        """
        for piece in self.stream_pieces(model_name, image, prompt, max_tokens=max_tokens, temperature=temperature,
                                        top_p=top_p, seed=seed, ignore_eos=ignore_eos):
            if piece.text:
                yield piece.text

    def stream_pieces(self, model_name: str, image: ImageLike, prompt: str, *, max_tokens: int | None = None,
                      temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                      ignore_eos: bool = False) -> Iterator[StreamPiece]:
        """Like :meth:`stream`, with token counts and the finish reason (the last piece has one)."""
        import tritonclient.grpc as grpc_module
        from tritonclient.utils import InferenceServerException

        target = model_name if model_name.endswith("_stream") else f"{model_name}_stream"
        data = np.frombuffer(encode_image(image), dtype=np.uint8)[None, :]
        inputs = self._inputs(grpc_module, data, prompt, max_tokens, temperature, top_p, seed)
        inputs.append(self._tensor(grpc_module, "ignore_eos", np.array([[ignore_eos]], dtype=np.bool_), "BOOL"))
        inputs.append(self._tensor(grpc_module, "stream", np.array([[True]], dtype=np.bool_), "BOOL"))
        pieces: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = self._stream_client(grpc_module)
        finished = False
        try:
            client.start_stream(callback=lambda result, error: pieces.put((result, error)),
                                stream_timeout=self.timeout)
            client.async_stream_infer(target, inputs)
            while True:
                try:
                    result, error = pieces.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServerUnreachableError(f"no response from {target} in {self.timeout:.0f}s") from None
                if error is not None:
                    raise _translate(error, target, self.grpc_url) if isinstance(
                        error, InferenceServerException) else ServerUnreachableError(str(error))
                piece = StreamPiece(
                    text=result.as_numpy("generated_text").reshape(-1)[0].decode("utf-8"),
                    generated_tokens=int(result.as_numpy("generated_tokens").reshape(-1)[0]),
                    prompt_tokens=int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
                    finish_reason=result.as_numpy("finish_reason").reshape(-1)[0].decode("utf-8"))
                if piece.finish_reason:
                    finished = True
                yield piece
                if finished:
                    return
        finally:
            # Cancel only a request that is still running (the caller left early, or an error): cancelling one
            # that just ended races with its final response, and Triton 2.51 then never releases the request
            # (the <model>_stream model can no longer be unloaded).
            client.stop_stream(cancel_requests=not finished)

    # -- server state -------------------------------------------------------------------------------------
    def is_ready(self, model_name: str | None = None) -> bool:
        try:
            client = self._client()
            return bool(client.is_model_ready(model_name) if model_name else client.is_server_ready())
        except Exception:
            return False

    def wait_until_ready(self, timeout: float = 60.0, model_name: str | None = None) -> None:
        """Poll until the server (and ``model_name``, if given) is ready; :class:`ServerUnreachableError` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.is_ready(model_name):
            if time.monotonic() >= deadline:
                what = f"model {model_name!r} on " if model_name else ""
                raise ServerUnreachableError(f"{what}{self.url} not ready after {timeout:.0f}s")
            time.sleep(0.25)

    def list_models(self) -> list[dict[str, str]]:
        """The repository index: name, version and state of every model.

        triton-vlm's launcher keeps the repository API (which also loads and unloads models) behind an admin
        key; without it, the loaded models are listed from the statistics API, each with its readiness.
        """
        try:
            index = self._call(lambda c: c.get_model_repository_index(), None)
        except TritonVLMError as exc:
            if "is restricted" not in str(exc):
                raise
            return self._loaded_models()
        if self.protocol == "grpc":
            return [{"name": m.name, "version": m.version, "state": m.state} for m in index.models]
        return [{k: str(v) for k, v in m.items()} for m in index]

    def _loaded_models(self) -> list[dict[str, str]]:
        stats = self._call(lambda c: c.get_inference_statistics(), None)
        if self.protocol == "grpc":
            versions = [(m.name, m.version) for m in stats.model_stats]
        else:
            versions = [(m["name"], m["version"]) for m in stats.get("model_stats", [])]
        return [{"name": name, "version": version,
                 "state": "READY" if self.is_ready(name) else "UNAVAILABLE"} for name, version in versions]

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:
                pass

    def __enter__(self) -> TritonVLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------
    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            module = self._module()
            if self.protocol == "grpc":
                client = module.InferenceServerClient(self.url)
            else:
                client = module.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                      network_timeout=self.timeout)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _stream_client(self, grpc_module: Any) -> Any:
        """This thread's gRPC client for streams (a channel is costly to set up; a stream is not)."""
        client = getattr(self._local, "stream_client", None)
        if client is None:
            client = grpc_module.InferenceServerClient(self.grpc_url)
            self._local.stream_client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _timeout_kwargs(self) -> dict[str, Any]:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def _inputs(self, module: Any, data: np.ndarray, prompt: str, max_tokens: int | None,
                temperature: float | None, top_p: float | None, seed: int | None) -> list[Any]:
        inputs = [self._tensor(module, "image", data, "UINT8"),
                  self._tensor(module, "prompt", np.array([[prompt.encode("utf-8")]], dtype=np.object_), "BYTES")]
        for name, value, dtype, triton_type in (("max_tokens", max_tokens, np.int32, "INT32"),
                                                ("temperature", temperature, np.float32, "FP32"),
                                                ("top_p", top_p, np.float32, "FP32"),
                                                ("seed", seed, np.int64, "INT64")):
            if value is not None:
                inputs.append(self._tensor(module, name, np.array([[value]], dtype=dtype), triton_type))
        return inputs

    @staticmethod
    def _tensor(module: Any, name: str, array: np.ndarray, triton_type: str) -> Any:
        tensor = module.InferInput(name, list(array.shape), triton_type)
        tensor.set_data_from_numpy(array)
        return tensor

    def _call(self, fn: Any, model_name: str | None) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return fn(self._client())
        except InferenceServerException as exc:
            raise _translate(exc, model_name, self.url) from None
        except (ConnectionError, OSError) as exc:
            raise ServerUnreachableError(f"cannot reach triton-vlm server at {self.url}: {exc}") from None


def _translate(exc: Any, model_name: str | None, url: str) -> TritonVLMError:
    from triton_vlm.error_tags import split_error_tag

    message = exc.message() or str(exc)
    status = str(exc.status() or "")
    code, untagged = split_error_tag(message)
    if message != untagged:  # a tagged stream error: the tag is the status
        message = untagged
        status = {"INVALID_ARG": "400", "UNAVAILABLE": "503", "NOT_FOUND": "404"}.get(code, "500")
    lowered = message.lower()
    if "has no available versions" in lowered or ("stub process" in lowered and "not healthy" in lowered):
        # The model exists but cannot serve this moment: its Python stub died, or it is being reloaded.
        return ModelUnavailableError(f"model {model_name!r} is not available right now (restarting?); "
                                     f"retry shortly: {message}")
    if status == "StatusCode.DEADLINE_EXCEEDED" or lowered == "deadline exceeded":
        return ModelUnavailableError(f"no complete answer from {model_name!r} within the client's timeout "
                                     f"(server overloaded, or the model restarted under the request): {message}")
    if "exceeds maximum queue size" in lowered or "request timeout expired" in lowered:
        return ModelUnavailableError(f"model {model_name!r} is overloaded (its queue is full or the request "
                                     f"waited past its timeout); retry with backoff: {message}")
    if "unknown model" in lowered or ("not found" in lowered and model_name and model_name in message):
        return UnknownModelError(f"model {model_name!r} is not served at {url}: {message}")
    if status in ("400", "StatusCode.INVALID_ARGUMENT"):
        return InvalidInputError(message)
    if status in ("503", "StatusCode.UNAVAILABLE"):
        if "failed to connect" in lowered or "connection refused" in lowered or "unavailable" == lowered:
            return ServerUnreachableError(f"cannot reach triton-vlm server at {url}: {message}")
        return ModelUnavailableError(message)
    if status in ("", "None") and ("connect" in lowered or "refused" in lowered):
        return ServerUnreachableError(f"cannot reach triton-vlm server at {url}: {message}")
    if status in ("404", "StatusCode.NOT_FOUND"):
        return UnknownModelError(message)
    return GenerationError(message)
