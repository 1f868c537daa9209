"""Find the model repository and render the copy that one server run serves."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from triton_vlm._protocol.model_config import ModelConfig, dump_model_config, force_instance_kind, load_model_config
from triton_vlm.config import ModelSettings, read_settings, string_parameters
from triton_vlm.config.contract import complete_config, with_stream_input
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


#: The name of a public model's engine model: ``llava`` -> ``llava_stream``.
STREAM_SUFFIX = "_stream"


def list_models(repository: Path) -> list[str]:
    """The models of the repository (directories with a config.pbtxt): the public ones. Their ``<model>_stream``
    engine models are not directories: they are derived at launch (:func:`stream_config`)."""
    models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    stale = [m for m in models if m.endswith(STREAM_SUFFIX) and m.removesuffix(STREAM_SUFFIX) in models]
    if stale:
        raise LauncherError(f"{repository}: {', '.join(stale)} would hide the engine model the launcher derives "
                            f"from {', '.join(m.removesuffix(STREAM_SUFFIX) for m in stale)}; delete that directory "
                            "(engine settings are parameters of the public model's config.pbtxt, or "
                            "TRITON_VLM_<MODEL>_STREAM_<KEY>)")
    return models


def _parameters(repository: Path, model: str) -> dict[str, str]:
    return string_parameters(load_model_config(repository / model / "config.pbtxt").parameters)


def base_model(repository: Path, model: str) -> str | None:
    """For an engine model (``<m>_stream``, derived from ``m`` at launch): ``m``; None for the repository's own."""
    base = model.removesuffix(STREAM_SUFFIX)
    if base == model or (repository / model / "config.pbtxt").is_file():
        return None
    return base if (repository / base / "config.pbtxt").is_file() else None


def model_family(repository: Path, model: str) -> str:
    """The family that serves ``model``: its ``model_family`` parameter (its base model's, for an engine model),
    else its name."""
    source = base_model(repository, model) or model
    return _parameters(repository, source).get("model_family") or source


def companions(repository: Path, model: str) -> list[str]:
    """The engine model served beside public ``model``: ``<model>_stream`` where its family has an engine."""
    from triton_vlm.models import get_family  # imports torch: only when a server really starts

    if base_model(repository, model) is not None:
        return []
    return [model + STREAM_SUFFIX] if get_family(model_family(repository, model)).has_engine else []


def servable_models(repository: Path) -> list[str]:
    """Models whose family this version can serve (the default selection); engine models come with theirs."""
    from triton_vlm.models import get_family

    return [m for m in list_models(repository) if get_family(model_family(repository, m)).supported]


def public_config(repository: Path, model: str) -> ModelConfig:
    """``model``'s config.pbtxt, completed from the shared contract where it is short (what add-model writes),
    with the contract's extras of its family (a ``task`` input, outputs such as ``entities``)."""
    config = load_model_config(repository / model / "config.pbtxt")
    config.name = config.name or model
    if not config.input:
        from triton_vlm.models import get_family

        family = get_family(model_family(repository, model))
        complete_config(config, family.tasks, family.extra_outputs)
    return config


def stream_config(public: ModelConfig, family: str) -> ModelConfig:
    """The config of ``<model>_stream``, the engine model of a (completed) public config: decoupled, the public
    contract plus the ``stream`` input, as many requests per execute() as its engine runs (execute() only
    enqueues), one instance (an engine owns its GPU), no batching delay (its scheduler batches between decode
    steps) and no Triton queue policy (in Triton 2.51 one turns payload prefetching off; the engine bounds its
    own queue). Its parameters are the public model's plus ``base_model``, so its stub reads nothing else."""
    engine = _settings(public.name, public, family, env={}).engine
    stream = ModelConfig(name=public.name + STREAM_SUFFIX, backend=public.backend,
                         max_batch_size=engine.max_num_seqs)
    stream.model_transaction_policy.decoupled = True
    stream.input.extend(with_stream_input(public.input))
    stream.output.extend(public.output)
    stream.dynamic_batching.SetInParent()
    group = stream.instance_group.add()
    if public.instance_group:
        group.CopyFrom(public.instance_group[0])
    else:
        group.kind = group.KIND_GPU
    group.count = 1
    for key, value in {"model_family": family, **string_parameters(public.parameters)}.items():
        stream.parameters[key].string_value = value
    stream.parameters["base_model"].string_value = public.name
    return stream


def _settings(model: str, config: ModelConfig, family: str, env: Mapping[str, str] | None) -> ModelSettings:
    # As the stub reads them: its model.py names the family where the config does not.
    return read_settings(model, {"model_family": family, **string_parameters(config.parameters)}, env)


def model_settings(repository: Path, model: str, env: Mapping[str, str] | None = None) -> ModelSettings:
    """The settings ``model`` (public, or an engine model) will load with (``env``: default os.environ)."""
    base = base_model(repository, model)
    family = model_family(repository, model)
    config = stream_config(public_config(repository, base), family) if base else public_config(repository, model)
    return _settings(model, config, family, env)


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


STREAM_SOURCE = '''"""{base} on triton-vlm's engine (decoupled, streaming); rendered by triton-vlm's launcher."""

from triton_vlm.backend import TritonVLMStreamModel


class TritonPythonModel(TritonVLMStreamModel):
    family = "{family}"
'''


def render_repository(source: Path, target: Path, models: list[str], instance_kind: str | None) -> Path:
    """Write ``models`` from ``source`` to ``target``: each public model's directory with its config completed
    (:func:`public_config`), each engine model (``<m>_stream``) derived from its public model. With
    ``instance_kind`` ("KIND_CPU"/"KIND_GPU") every instance group is rewritten to it (GPU configs on a host
    without GPUs). Every config's parameters are checked against the schema here, before Triton starts."""
    known = list_models(source)
    engines = {m for m in models if m not in known and (base := base_model(source, m)) and
               companions(source, base) == [m]}
    unknown = [m for m in models if m not in known and m not in engines]
    if unknown:
        raise LauncherError(f"unknown model(s) {', '.join(unknown)}; the repository {source} has: "
                            f"{', '.join(known)} (and <model>_stream for those whose family has an engine)")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for model in models:
        base = base_model(source, model)
        if model in engines and base is not None:
            family = model_family(source, base)
            config = stream_config(public_config(source, base), family)
            (target / model / "1").mkdir(parents=True)
            (target / model / "1" / "model.py").write_text(STREAM_SOURCE.format(base=base, family=family))
        else:
            shutil.copytree(source / model, target / model, ignore=shutil.ignore_patterns("__pycache__"))
            config = public_config(source, model)
            _settings(model, config, model_family(source, model), env={})  # a bad parameter fails the launch
        if instance_kind:
            force_instance_kind(config, instance_kind)
        (target / model / "config.pbtxt").write_text(dump_model_config(config))
    return target
