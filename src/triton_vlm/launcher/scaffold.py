"""``triton-vlm add-model``: a new model directory, a few lines of config.pbtxt and the 7-line model.py.

The config names the model, its family and its weights; everything else has its default in the schema
(``triton_vlm/config/schema.py``), and the launcher completes the Triton side (the I/O contract with the family's
extras, batching, one GPU instance) from the template every public model shares (``triton_vlm/config/contract.py``),
and derives ``<name>_stream`` where the family has an engine.
"""

from __future__ import annotations

import re
from pathlib import Path

from triton_vlm.config import WeightsConfig, env_prefix
from triton_vlm.errors import InvalidInputError

#: Triton model names are directory names; keep them to what every shell, URL and env prefix takes.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

CONFIG_TEMPLATE = """\
# {name}: {weights}, served by triton-vlm's shared Python backend (family {family}). At launch the
# launcher adds the I/O contract, dynamic batching and one GPU instance every model shares
# (src/triton_vlm/config/contract.py; write them here to change them). Every setting has its default in
# src/triton_vlm/config/schema.py: add one here as a parameter, or override it with {env_prefix}<KEY>.
name: "{name}"
backend: "python"
parameters {{ key: "model_family" value: {{ string_value: "{family}" }} }}
"""
PARAMETER = 'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'

MODEL_PY_TEMPLATE = '''\
"""Triton Python backend entry point for the {family} family; the logic lives in triton_vlm.backend."""

from triton_vlm.backend import TritonVLMModel


class TritonPythonModel(TritonVLMModel):
    family = "{family}"
'''


def render_config(name: str, family: str, hf_model_id: str, revision: str = WeightsConfig.revision,
                  local_path: str = "") -> str:
    """The ``config.pbtxt`` of model ``name`` served by ``family`` with weights ``hf_model_id`` (the revision
    only where it is not the default) or from the directory ``local_path`` (then ``hf_model_id`` may be "")."""
    from triton_vlm.models import get_family

    get_family(family)  # UnknownModelError lists the families
    checked = [("hf_model_id", hf_model_id)] if hf_model_id or not local_path else []
    if local_path:
        checked.append(("local_path", local_path))
    if revision != WeightsConfig.revision:
        checked.append(("revision", revision))
    for field, value in checked:
        if not value or any(c in value for c in '"\\\n'):
            raise InvalidInputError(f"{field}: expected a non-empty value without quotes or newlines, got {value!r}")
    text = CONFIG_TEMPLATE.format(name=name, family=family, weights=local_path or hf_model_id,
                                  env_prefix=env_prefix(name))
    return text + "".join(PARAMETER.format(key=key, value=value) for key, value in checked)


def render_model_py(family: str) -> str:
    return MODEL_PY_TEMPLATE.format(family=family)


def add_model(repository: Path, name: str, hf_model_id: str, *, family: str = "auto",
              revision: str = WeightsConfig.revision, local_path: str = "", force: bool = False) -> Path:
    """Write ``<repository>/<name>/{config.pbtxt,1/model.py}``; returns the model directory. ``local_path``: a
    checkpoint directory to load instead of ``hf_model_id`` (``triton-vlm serve DIR``).

    Refuses a bad name, an unknown family, and (unless ``force``) a model directory that already exists.
    """
    if not MODEL_NAME.match(name) or name.endswith("_stream"):
        raise InvalidInputError(f"model name {name!r}: use letters, digits, '_', '.', '-' (at most 64, not "
                                "ending in _stream, which names engine models)")
    config = render_config(name, family, hf_model_id, revision, local_path)
    target = Path(repository) / name
    if target.exists() and not force:
        raise InvalidInputError(f"{target} already exists; pick another name or pass --force to overwrite it")
    (target / "1").mkdir(parents=True, exist_ok=True)
    (target / "config.pbtxt").write_text(config)
    (target / "1" / "model.py").write_text(render_model_py(family))
    return target
