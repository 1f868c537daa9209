"""``triton-vlm add-model``: a new model directory from the config every public model shares.

The template below is the contract of ``triton_models/{llava,kosmos2,moondream2}/config.pbtxt`` (the unit tests
render it for each of them and compare): the same inputs, outputs, batching and parameters, plus what the family
adds (a ``task`` input for families with tasks, optional outputs such as kosmos2's ``entities``).
"""

from __future__ import annotations

import re
from pathlib import Path

from triton_vlm.errors import InvalidInputError

#: Triton model names are directory names; keep them to what every shell, URL and env prefix takes.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

CONFIG_TEMPLATE = """\
# {name}: served through the shared Python backend in src/triton_vlm (see README "Configuration").
name: "{name}"
backend: "python"

# max_batch_size > 0 lets Triton's dynamic batcher group requests; the backend then runs ONE batched
# generation per execute(). (max_batch_size: 0 disables batching: Triton then rejects dynamic_batching.)
max_batch_size: 8

input [
  # Raw bytes of a PNG/JPEG file. Sizes differ per request, hence ragged batching.
  {{ name: "image" data_type: TYPE_UINT8 dims: [ -1 ] allow_ragged_batch: true }},
  {{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "ignore_eos" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}{task_input}
]
output [
  {{ name: "generated_text" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "generated_tokens" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "prompt_tokens" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }}{extra_outputs}
]

dynamic_batching {{
  # No wait for company: while the instance is busy, Triton keeps adding arrivals to the next batch, so batches
  # still fill under load, and a lone request runs at once (--batch-delay-us or _BATCH_DELAY_US to change it).
  max_queue_delay_microseconds: 0
  # No queue policy here on purpose: in Triton 2.51 any default_queue_policy turns payload prefetching off, and
  # a model with one instance then misses the wake-up after each batch and leaves the next request queued up to
  # 500 ms (docs/reliability.md, "Overload"). To bound the queue anyway (UNAVAILABLE past N waiting, a queue
  # timeout, per-request timeouts): --max-queue-size / --queue-timeout-ms, or TRITON_VLM_<MODEL>_MAX_QUEUE_SIZE
  # / _QUEUE_TIMEOUT_MS. On GPU hosts the engine (<model>_stream) bounds what runs and waits by default.
}}

# On hosts without a GPU the launcher serves these instances as KIND_CPU.
instance_group [ {{ kind: KIND_GPU count: 1 }} ]

# Every value below can be overridden by {env_prefix}<KEY> (e.g. ..._LOCAL_PATH).
parameters {{ key: "model_family" value: {{ string_value: "{family}" }} }}
parameters {{ key: "hf_model_id" value: {{ string_value: "{hf_model_id}" }} }}
parameters {{ key: "revision" value: {{ string_value: "{revision}" }} }}
parameters {{ key: "local_path" value: {{ string_value: "" }} }}
parameters {{ key: "dtype" value: {{ string_value: "auto" }} }}
parameters {{ key: "device" value: {{ string_value: "auto" }} }}
parameters {{ key: "preload" value: {{ string_value: "false" }} }}
parameters {{ key: "trust_remote_code" value: {{ string_value: "false" }} }}
parameters {{ key: "default_max_tokens" value: {{ string_value: "128" }} }}
parameters {{ key: "max_tokens_limit" value: {{ string_value: "1024" }} }}
# Request limits (docs/reliability.md): encoded image bytes; decoded pixels and width:height (both checked from
# the header before decoding, so decompression bombs and 1 x 40000 strips never expand).
parameters {{ key: "max_image_bytes" value: {{ string_value: "20971520" }} }}
parameters {{ key: "max_image_pixels" value: {{ string_value: "40000000" }} }}
parameters {{ key: "max_image_aspect_ratio" value: {{ string_value: "100" }} }}
"""

TASK_INPUT = """,
  # Skill of the model: {tasks}.
  {{ name: "task" data_type: TYPE_STRING dims: [ 1 ] optional: true }}"""

EXTRA_OUTPUT = """,
  # Optional (JSON; "{default}" when the answer has none): clients that do not ask for it never get it.
  {{ name: "{name}" data_type: TYPE_STRING dims: [ 1 ] }}"""

MODEL_PY_TEMPLATE = '''\
"""Triton Python backend entry point for the {family} family; the logic lives in triton_vlm.backend."""

from triton_vlm.backend import TritonVLMModel


class TritonPythonModel(TritonVLMModel):
    family = "{family}"
'''


def render_config(name: str, family: str, hf_model_id: str, revision: str = "main") -> str:
    """The ``config.pbtxt`` of model ``name`` served by ``family`` with weights ``hf_model_id``."""
    from triton_vlm.models import get_family
    from triton_vlm.settings import env_prefix

    adapter = get_family(family)  # UnknownModelError lists the families
    for field, value in (("hf_model_id", hf_model_id), ("revision", revision)):
        if not value or any(c in value for c in '"\\\n'):
            raise InvalidInputError(f"{field}: expected a non-empty value without quotes or newlines, got {value!r}")
    task_input = TASK_INPUT.format(tasks=", ".join(adapter.tasks)) if adapter.tasks else ""
    extra_outputs = "".join(EXTRA_OUTPUT.format(name=output, default=default)
                            for output, default in adapter.extra_outputs.items())
    return CONFIG_TEMPLATE.format(name=name, family=family, hf_model_id=hf_model_id, revision=revision,
                                  env_prefix=env_prefix(name), task_input=task_input, extra_outputs=extra_outputs)


def render_model_py(family: str) -> str:
    return MODEL_PY_TEMPLATE.format(family=family)


def add_model(repository: Path, name: str, hf_model_id: str, *, family: str = "auto", revision: str = "main",
              force: bool = False) -> Path:
    """Write ``<repository>/<name>/{config.pbtxt,1/model.py}``; returns the model directory.

    Refuses a bad name, an unknown family, and (unless ``force``) a model directory that already exists.
    """
    if not MODEL_NAME.match(name) or name.endswith("_stream"):
        raise InvalidInputError(f"model name {name!r}: use letters, digits, '_', '.', '-' (at most 64, not "
                                "ending in _stream, which names engine companions)")
    config = render_config(name, family, hf_model_id, revision)
    target = Path(repository) / name
    if target.exists() and not force:
        raise InvalidInputError(f"{target} already exists; pick another name or pass --force to overwrite it")
    (target / "1").mkdir(parents=True, exist_ok=True)
    (target / "config.pbtxt").write_text(config)
    (target / "1" / "model.py").write_text(render_model_py(family))
    return target
