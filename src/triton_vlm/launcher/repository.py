"""Find the model repository and render the copy that one server run serves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from triton_vlm._protocol.model_config import dump_model_config, force_instance_kind, load_model_config
from triton_vlm.launcher.distribution import LauncherError


def default_model_repository() -> Path:
    """``$TRITON_VLM_MODEL_REPOSITORY``, else ``triton_models/`` in the current directory or a parent of it,
    else the one beside this source tree."""
    explicit = os.environ.get("TRITON_VLM_MODEL_REPOSITORY")
    if explicit:
        return Path(explicit)
    for directory in [Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]:
        candidate = directory / "triton_models"
        if candidate.is_dir():
            return candidate
    raise LauncherError("no model repository found: run from the project directory or set "
                        "TRITON_VLM_MODEL_REPOSITORY")


def list_models(repository: Path) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())


def model_family(repository: Path, model: str) -> str:
    config = load_model_config(repository / model / "config.pbtxt")
    param = config.parameters.get("model_family")
    if param and param.string_value:
        return param.string_value
    base = config.parameters.get("base_model")
    return model_family(repository, base.string_value) if base and base.string_value else model


def base_model(repository: Path, model: str) -> str | None:
    """For a companion model (``<m>_stream``), the model whose weights it serves."""
    param = load_model_config(repository / model / "config.pbtxt").parameters.get("base_model")
    return param.string_value if param and param.string_value else None


def companions(repository: Path, model: str) -> list[str]:
    return [m for m in list_models(repository) if base_model(repository, m) == model]


def servable_models(repository: Path) -> list[str]:
    """Models whose family this version can serve (the default selection); companions come with their base."""
    from triton_vlm.models import get_family  # imports torch: only when a server really starts

    return [m for m in list_models(repository)
            if base_model(repository, m) is None and get_family(model_family(repository, m)).supported]


FORWARDER_SOURCE = '''"""Forwards {model} requests to {target} (rendered by triton-vlm's launcher for engine hosts)."""

from triton_vlm.backend import ForwardingModel


class TritonPythonModel(ForwardingModel):
    pass
'''


def make_forwarder(model_dir: Path, target: str, instances: int, grpc_url: str) -> None:
    """Turn a rendered public model into a light forwarder to ``target``, with ``instances`` CPU instances, that
    reaches the server at ``grpc_url``."""
    config = load_model_config(model_dir / "config.pbtxt")
    del config.instance_group[:]
    group = config.instance_group.add()
    group.kind = group.KIND_CPU
    group.count = instances
    config.parameters["forward_to"].string_value = target
    config.parameters["forward_grpc_url"].string_value = grpc_url
    (model_dir / "config.pbtxt").write_text(dump_model_config(config))
    (model_dir / "1" / "model.py").write_text(FORWARDER_SOURCE.format(model=model_dir.name, target=target))


def render_repository(source: Path, target: Path, models: list[str], instance_kind: str | None) -> Path:
    """Copy ``models`` from ``source`` to ``target``; with ``instance_kind`` ("KIND_CPU"/"KIND_GPU") every
    instance group is rewritten to it (GPU configs on a host without GPUs)."""
    known = list_models(source)
    unknown = [m for m in models if m not in known]
    if unknown:
        raise LauncherError(f"unknown model(s) {', '.join(unknown)}; the repository {source} has: "
                            f"{', '.join(known)}")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for model in models:
        shutil.copytree(source / model, target / model, ignore=shutil.ignore_patterns("__pycache__"))
        config = load_model_config(source / model / "config.pbtxt")
        base = config.parameters.get("base_model")
        if base and base.string_value:
            # A companion serves its base model's weights: copy the base's settings in (its own win), so the
            # companion's stub needs nothing but its own config.
            for key, value in load_model_config(source / base.string_value / "config.pbtxt").parameters.items():
                if key not in config.parameters:
                    config.parameters[key].string_value = value.string_value
        if instance_kind:
            force_instance_kind(config, instance_kind)
        (target / model / "config.pbtxt").write_text(dump_model_config(config))
    return target
