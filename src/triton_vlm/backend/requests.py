"""Reading Triton requests and writing Triton responses, shared by every backend model kind."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from triton_vlm._protocol import wire
from triton_vlm.config import settings_from_triton_args
from triton_vlm.errors import InvalidInputError, TritonVLMError
from triton_vlm.images import image_bytes_from_tensor, images_from_tensor
from triton_vlm.loading import resolve_device
from triton_vlm.runtime import GenerationRequest, VLMRuntime
from triton_vlm.sampling import TokenLogprob

T = TypeVar("T")


def runtime_from_args(args: dict[str, str], family: str | None) -> VLMRuntime:
    """The :class:`VLMRuntime` a model instance serves, from Triton's ``initialize`` arguments."""
    settings = settings_from_triton_args(args, family)
    device = resolve_device(settings, args.get("model_instance_kind", "CPU"),
                            int(args.get("model_instance_device_id", 0)))
    return VLMRuntime(settings, device)


def input_array(request: Any, name: str) -> npt.NDArray[Any] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def input_scalar(request: Any, name: str, kind: Callable[[Any], T]) -> T | None:
    array = input_array(request, name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidInputError(f"{name}: expected one value, got {array.size}", param=name)
    return kind(array.reshape(-1)[0])


def parse_request(request: Any, runtime: VLMRuntime) -> GenerationRequest:
    """Validate one Triton request into a :class:`GenerationRequest`; :class:`InvalidInputError` if bad.

    A request is either a prompt about one image (``prompt`` and ``image``) or a chat (``messages`` and, where the
    conversation has images, ``images``); both, or neither, is refused naming the field at fault."""
    options: dict[str, Any] = dict(  # the same sampling fields in either form
        max_tokens=input_scalar(request, "max_tokens", int),
        temperature=input_scalar(request, "temperature", float),
        top_p=input_scalar(request, "top_p", float),
        seed=input_scalar(request, "seed", int),
        ignore_eos=bool(input_scalar(request, "ignore_eos", bool) or False),
        task=input_scalar(request, "task", _as_text),
        stop=input_stop(request),
        n=input_scalar(request, "n", int),
        logprobs=input_scalar(request, "logprobs", bool),
        top_logprobs=input_scalar(request, "top_logprobs", int),
        presence_penalty=input_scalar(request, "presence_penalty", float),
        frequency_penalty=input_scalar(request, "frequency_penalty", float),
        repetition_penalty=input_scalar(request, "repetition_penalty", float),
        response_format=input_scalar(request, "response_format", _as_text),
    )
    messages = input_scalar(request, "messages", _as_text)
    images = input_array(request, "images")
    image = input_array(request, "image")
    prompt = input_array(request, "prompt")
    if messages is not None:
        for name, value in (("prompt", prompt), ("image", image)):
            if value is not None:
                raise InvalidInputError(f"{name}: a request sends either 'prompt' (with 'image') or 'messages' (with "
                                        f"'images'), not both; leave '{name}' out of a chat", param=name)
        return runtime.make_chat_request(messages, [] if images is None else images_from_tensor(images), **options)
    if images is not None:
        raise InvalidInputError("images: goes with 'messages' (a chat); a prompt request sends its one image as "
                                "'image'", param="images")
    if image is None or prompt is None:
        raise InvalidInputError("inputs 'image' and 'prompt' are required (or 'messages' for a chat)",
                                param="image" if image is None and prompt is not None else "prompt")
    prompts = prompt.reshape(-1)
    if prompts.size != 1:
        raise InvalidInputError(f"prompt: expected one string, got {prompts.size}", param="prompt")
    return runtime.make_request(image_bytes_from_tensor(image), _as_text(prompts[0]), **options)


def input_stop(request: Any) -> tuple[str, ...] | None:
    """The ``stop`` strings (one per element), checked as UTF-8; the count is checked with the other sampling
    values (``SamplingParams``)."""
    array = input_array(request, "stop")
    if array is None:
        return None
    strings = []
    for value in array.reshape(-1):
        raw = _as_text(value)
        try:
            strings.append(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except UnicodeDecodeError:
            raise InvalidInputError("stop: a string is not valid UTF-8", param="stop") from None
    return tuple(strings)


def _as_text(value: Any) -> bytes | str:
    # STRING tensors arrive as bytes objects; the runtime decodes (and validates) the UTF-8.
    return value if isinstance(value, (bytes, str)) else str(value)


def declared_extra_outputs(args: dict[str, str], defaults: Mapping[str, str]) -> dict[str, str]:
    """The family's optional outputs (name -> value when a response has none) that this model's config
    declares; a model that declares none of them answers with the four common outputs only."""
    declared = {output["name"] for output in json.loads(args["model_config"]).get("output", [])}
    return {name: value for name, value in defaults.items() if name in declared}


def extra_values(declared: Mapping[str, str], found: Mapping[str, str]) -> dict[str, str]:
    """Every declared extra output (name -> value when a response has none) with the value ``found`` for it."""
    return {name: found.get(name, default) for name, default in declared.items()}


def wire_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str]) -> tuple[wire.TokenLogprob, ...]:
    """``entries`` as the ``token_logprobs`` output carries them: each token (and alternative) with its own text."""
    return tuple(wire.TokenLogprob(e.token_id, token_text(e.token_id), e.logprob,
                                   tuple(wire.TopLogprob(i, token_text(i), v) for i, v in e.top)) for e in entries)


def output_response(text: str, generated_tokens: int, prompt_tokens: int, finish_reason: str | None,
                    extras: Mapping[str, str] | None = None, *, logprobs: Sequence[wire.TokenLogprob] = (),
                    choices: Sequence[wire.Choice] = (), index: int = 0, cached_tokens: int | None = None) -> Any:
    """The response tensors; ``extras`` are further STRING outputs (e.g. kosmos2's ``entities`` JSON);
    ``logprobs`` the ``token_logprobs`` output's entries (:func:`wire_logprobs`), ``choices`` the further choices of a
    whole answer, both encoded by :mod:`triton_vlm._protocol.wire`; ``index`` which choice a streamed piece belongs
    to; ``cached_tokens`` the prompt positions the prefix cache held, sent where given (a choice's last response:
    streamed pieces before it go without, as they do without ``extras``).

    A streamed piece that ends nothing (``finish_reason`` None) carries only what it has: ``token_logprobs`` where
    it has entries, ``index`` where it is not choice 0, never ``choices``. Each tensor of a response is an IPC
    allocation in the stub and an output Triton and the client handle, once per token; clients read a missing
    output as empty (``_protocol.results``). A response that ends something declares every output."""
    whole = finish_reason is not None
    tensors = [
        pb_utils.Tensor("generated_text", np.array([[text.encode("utf-8")]], dtype=np.object_)),
        pb_utils.Tensor("generated_tokens", np.array([[generated_tokens]], dtype=np.int32)),
        pb_utils.Tensor("prompt_tokens", np.array([[prompt_tokens]], dtype=np.int32)),
        pb_utils.Tensor("finish_reason", np.array([[(finish_reason or "").encode()]], dtype=np.object_)),
    ]
    if whole or logprobs:
        tensors.append(pb_utils.Tensor("token_logprobs", np.array([[wire.encode_logprobs(logprobs).encode("utf-8")]],
                                                                  dtype=np.object_)))
    if whole or choices:
        tensors.append(pb_utils.Tensor("choices", np.array([[wire.encode_choices(choices).encode("utf-8")]],
                                                           dtype=np.object_)))
    if whole or index:
        tensors.append(pb_utils.Tensor("index", np.array([[index]], dtype=np.int32)))
    if cached_tokens is not None:
        tensors.append(pb_utils.Tensor("cached_tokens", np.array([[cached_tokens]], dtype=np.int32)))
    tensors += [pb_utils.Tensor(name, np.array([[value.encode("utf-8")]], dtype=np.object_))
                for name, value in (extras or {}).items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error_response(exc: TritonVLMError) -> Any:
    """A per-request error response: Triton's code (which plain infer callers get), and the code and request
    field encoded in the message too (:mod:`triton_vlm._protocol.wire`), for the paths that lose the code
    (decoupled streams) and for the field, which Triton never carries."""
    code = getattr(pb_utils.TritonError, exc.code, pb_utils.TritonError.INTERNAL)
    message = wire.encode_error(exc.code, str(exc), exc.param)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
