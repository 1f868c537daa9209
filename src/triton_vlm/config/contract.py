"""The Triton side of every served model's config: its I/O contract, batching and instance, in one template.

The shipped public configs (``triton_models/*/config.pbtxt``) spell this out so a reader sees the whole contract
(the unit tests check each equals the template); a config that ``triton-vlm add-model`` writes names only
``name``, ``backend`` and its parameters, and the launcher completes it from here (:func:`complete_config`). A
``<model>_stream`` engine model's config is derived from its public model's with :func:`with_stream_input` (see
``launcher/repository.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from google.protobuf import text_format

from triton_vlm._protocol.model_config import model_config_pb2 as pb

#: Everything but the family's extras: the inputs every model takes, the four outputs every model returns.
#:
#: A request is one of two forms (the backend refuses both or neither, naming the field): a prompt about one image,
#: ``image`` (file bytes) + ``prompt``; or a chat, ``messages`` (OpenAI's chat shape as JSON, image parts
#: ``{"type": "image"}`` standing where the images are; :mod:`triton_vlm.chat`) + ``images`` (BYTES, one file per
#: element, in the order of the image parts; left out for a text-only chat). So all four are optional to Triton.
#: ``response_format`` (either form) is OpenAI's object as JSON: the answer follows its JSON schema
#: (:mod:`triton_vlm.structured`).
#:
#: Sampling and output options (either form): ``stop`` (up to 4 strings, one per element: the answer ends right
#: before the first), ``n`` (up to 8 choices from one prompt), ``logprobs`` / ``top_logprobs`` (up to 20), OpenAI's
#: ``presence_penalty`` / ``frequency_penalty`` and HF's ``repetition_penalty``. Every response also carries
#: ``token_logprobs`` (JSON, per generated token ``{"id", "token", "logprob", "top"}``; "" unless asked), ``choices``
#: (a whole answer with ``n`` > 1: JSON of choices 1 to n-1, the common outputs being choice 0; else "") and
#: ``index`` (which choice a streamed piece belongs to: a stream of n choices interleaves their pieces, each
#: choice's last piece carries its finish_reason, and the stream's FINAL response ends the last one) and
#: ``cached_tokens`` (prompt positions the engine's prefix cache held, choice 0's; 0 on the batched loop; on a
#: choice's last response and on a whole answer).
TEMPLATE = """
backend: "python"
max_batch_size: 8
input [
  { name: "image" data_type: TYPE_UINT8 dims: [ -1 ] allow_ragged_batch: true optional: true },
  { name: "prompt" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true },
  { name: "ignore_eos" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "messages" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "images" data_type: TYPE_STRING dims: [ -1 ] allow_ragged_batch: true optional: true },
  { name: "response_format" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "stop" data_type: TYPE_STRING dims: [ -1 ] allow_ragged_batch: true optional: true },
  { name: "n" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "logprobs" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "top_logprobs" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "presence_penalty" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "frequency_penalty" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "repetition_penalty" data_type: TYPE_FP32 dims: [ 1 ] optional: true }
]
output [
  { name: "generated_text" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "generated_tokens" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "prompt_tokens" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "token_logprobs" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "choices" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "index" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "cached_tokens" data_type: TYPE_INT32 dims: [ 1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 0 }
instance_group [ { kind: KIND_GPU count: 1 } ]
"""
#: A family with tasks (moondream2) takes this optional input after the common ones.
TASK_INPUT = 'name: "task" data_type: TYPE_STRING dims: [ 1 ] optional: true'
#: An engine model's extra input, right after the common ones: true (default) one response per new piece of
#: text; false one final response with the whole text.
STREAM_INPUT = 'name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true'


M = TypeVar("M")


def _parse(text: str, message: type[M]) -> M:
    result = message()
    text_format.Parse(text, result)
    return result


def template(tasks: Sequence[str] = (), extra_outputs: Iterable[str] = ()) -> pb.ModelConfig:
    """The contract of a model of a family with ``tasks`` and ``extra_outputs`` (e.g. kosmos2's ``entities``):
    everything a config.pbtxt holds but its name and parameters."""
    config = _parse(TEMPLATE, pb.ModelConfig)
    if tasks:
        config.input.append(_parse(TASK_INPUT, pb.ModelInput))
    for name in extra_outputs:
        config.output.add(name=name, data_type=pb.TYPE_STRING, dims=[1])
    return config


def complete_config(config: pb.ModelConfig, tasks: Sequence[str] = (), extra_outputs: Iterable[str] = ()) -> bool:
    """Fill a short config (no ``input``: what add-model writes) from :func:`template`, keeping what it sets
    itself; a config with inputs is left as it is. Returns whether it was completed."""
    if config.input:
        return False
    full = template(tasks, extra_outputs)
    if not config.backend:
        config.backend = full.backend
    if not config.max_batch_size:
        config.max_batch_size = full.max_batch_size
    config.input.extend(full.input)
    if not config.output:
        config.output.extend(full.output)
    if not config.HasField("dynamic_batching"):
        config.dynamic_batching.CopyFrom(full.dynamic_batching)
    if not config.instance_group:
        config.instance_group.extend(full.instance_group)
    return True


def with_stream_input(inputs: Sequence[Any]) -> list[Any]:
    """``inputs`` (``ModelInput`` messages) with the engine's ``stream`` input after the last common one (so
    before a family's ``task``)."""
    common = {spec.name for spec in template().input}
    at = max((i + 1 for i, spec in enumerate(inputs) if spec.name in common), default=len(inputs))
    return [*inputs[:at], _parse(STREAM_INPUT, pb.ModelInput), *inputs[at:]]
