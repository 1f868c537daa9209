"""Request input tensors from typed request fields, for any of tritonclient's four client modules."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

#: Which tritonclient module the tensors are for: ``tritonclient.<api>``.
Api = Literal["http", "grpc", "http.aio", "grpc.aio"]

#: The optional scalar inputs, each with the numpy type it is sent as (Triton's type follows from it).
OPTIONAL_INPUTS: tuple[tuple[str, type[np.generic]], ...] = (
    ("max_tokens", np.int32), ("temperature", np.float32), ("top_p", np.float32), ("seed", np.int64),
    ("ignore_eos", np.bool_), ("task", np.object_), ("stream", np.bool_), ("response_format", np.object_),
    ("n", np.int32), ("logprobs", np.bool_), ("top_logprobs", np.int32), ("presence_penalty", np.float32),
    ("frequency_penalty", np.float32), ("repetition_penalty", np.float32))


@dataclass(frozen=True)
class RequestFields:
    """One request's inputs; an optional field left at None is not sent (the model's default applies).

    Either ``image`` + ``prompt`` (a prompt about one image) or ``messages`` + ``images`` (a chat: the messages
    as JSON, :mod:`triton_vlm.chat`, and the file bytes of each image part in order; none for a text-only chat).
    """

    image: bytes | None = None  #: encoded file bytes (PNG, JPEG...)
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    task: str | None = None
    #: True: token by token (``<model>_stream`` only); False: the whole answer in one response.
    stream: bool | None = None
    messages: str | None = None
    images: tuple[bytes, ...] = ()
    #: OpenAI's ``response_format`` object as JSON (structured output).
    response_format: str | None = None
    #: Sampling and output options (docs/contract.md): the answer ends before the first ``stop`` string (up to 4);
    #: ``n`` choices; per-token ``logprobs`` with ``top_logprobs`` alternatives; OpenAI's and HF's penalties.
    stop: tuple[str, ...] = ()
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None

    def arrays(self) -> list[tuple[str, npt.NDArray[Any]]]:
        """``(name, array)`` of every input to send, each ``[1, n]`` (a batch of one)."""
        arrays: list[tuple[str, npt.NDArray[Any]]] = []
        if self.image is not None:
            arrays.append(("image", np.frombuffer(self.image, dtype=np.uint8)[None, :]))
        if self.prompt is not None:
            arrays.append(("prompt", np.array([[self.prompt.encode("utf-8")]], dtype=np.object_)))
        if self.messages is not None:
            arrays.append(("messages", np.array([[self.messages.encode("utf-8")]], dtype=np.object_)))
        if self.images:
            images = np.empty((1, len(self.images)), dtype=np.object_)  # bytes elements, never numpy's bytes_
            images[0, :] = list(self.images)
            arrays.append(("images", images))
        if self.stop:
            arrays.append(("stop", np.array([[s.encode("utf-8") for s in self.stop]], dtype=np.object_)))
        for name, dtype in OPTIONAL_INPUTS:
            value = getattr(self, name)
            if value is not None:
                value = value.encode("utf-8") if isinstance(value, str) else value
                arrays.append((name, np.array([[value]], dtype=dtype)))
        return arrays


def client_module(api: Api) -> Any:
    """``tritonclient.<api>`` (imported on first use: the HTTP and asyncio modules pull in their own stacks)."""
    return importlib.import_module(f"tritonclient.{api}")


def input_tensor(api: Api, name: str, array: npt.NDArray[Any]) -> Any:
    """One ``InferInput`` holding ``array``; its Triton type follows from the array's (object: BYTES)."""
    from tritonclient.utils import np_to_triton_dtype

    tensor = client_module(api).InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)  # serialized here: the array may be freed or reused afterwards
    return tensor


def input_tensors(api: Api, arrays: Iterable[tuple[str, npt.NDArray[Any]]]) -> list[Any]:
    return [input_tensor(api, name, array) for name, array in arrays]


def request_inputs(api: Api, fields: RequestFields) -> list[Any]:
    """The input tensors of one request."""
    return input_tensors(api, fields.arrays())


def requested_outputs(api: Api, names: Iterable[str]) -> list[Any]:
    """The ``InferRequestedOutput`` list asking for ``names`` (without one, a model returns all it declares)."""
    module = client_module(api)
    return [module.InferRequestedOutput(name) for name in names]
