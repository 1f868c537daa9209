"""Serve one checkpoint by its Hugging Face id or directory (``triton-vlm serve ID``): read its ``config.json``,
pick the family from its ``architectures``, derive the served name, and write its model repository entry (what
``add-model`` writes) into a repository of its own for that server run.

The launcher renders that repository as any other, so the public model and, where the family has an engine, its
``<name>_stream`` come out of the one code path (:mod:`triton_vlm.launcher.repository`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triton_vlm.config import WeightsConfig
from triton_vlm.launcher.distribution import LauncherError
from triton_vlm.launcher.repository import STREAM_SUFFIX

#: A Hugging Face id: ``name`` or ``owner/name`` (letters, digits, ``-``, ``_``, ``.``).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
#: Characters a served name may not hold (see scaffold.MODEL_NAME), replaced by ``-``.
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class CheckpointRequest:
    """What ``triton-vlm serve SOURCE`` asks for: a checkpoint directory or a Hugging Face id; optionally the
    served name (default: derived from ``source``), the family (default: picked from config.json; ``auto``
    forces transformers' AutoModelForImageTextToText) and the hub revision."""

    source: str
    name: str | None = None
    family: str | None = None
    revision: str = WeightsConfig.revision


@dataclass(frozen=True)
class ServedCheckpoint:
    """A resolved :class:`CheckpointRequest`: what the repository entry says."""

    name: str
    family: str
    #: The hub id ("" for a directory) and the directory ("" for a hub id): the entry's weights settings.
    hf_model_id: str
    local_path: str
    revision: str
    #: What its config.json names, for messages.
    architectures: tuple[str, ...]

    def served_models(self) -> list[str]:
        """The public model, and ``<name>_stream`` where the family has an engine."""
        from triton_vlm.models import get_family

        return [self.name, *([self.name + STREAM_SUFFIX] if get_family(self.family).has_engine else [])]

    def describe(self) -> str:
        weights = self.local_path or (self.hf_model_id + (f"@{self.revision}" if self.revision != "main" else ""))
        picked = f"architecture {self.architectures[0]}" if self.architectures else "no architectures"
        return f"{' and '.join(self.served_models())} from {weights} (family {self.family}; {picked})"


def local_checkpoint(source: str) -> Path | None:
    """The directory ``source`` names, or None for a hub id; raises where it is neither."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or source.startswith(("/", ".", "~")) or not HUB_ID.match(source):
        raise LauncherError(f"{source!r} is neither a checkpoint directory nor a Hugging Face id (owner/name)")
    return None


def read_checkpoint_config(source: str, revision: str = WeightsConfig.revision,
                           cache_dir: Path | None = None) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory, or of a hub id through the Hugging Face cache (downloaded
    where the Hub answers; only the cache with ``HF_HUB_OFFLINE=1`` or the Hub out of reach). ``cache_dir``:
    huggingface_hub's default (``HF_HUB_CACHE``) unless given."""
    directory = local_checkpoint(source)
    if directory is not None:
        path = directory / "config.json"
        if not path.is_file():
            raise LauncherError(f"{directory} is not a checkpoint directory (no config.json); point at a directory "
                                "made by save_pretrained or `hf download ID --local-dir DIR`")
    else:
        path = _download_config(source, revision, cache_dir)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LauncherError(f"{source}: cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise LauncherError(f"{source}: {path} is not a JSON object")
    return config


def _download_config(model_id: str, revision: str, cache_dir: Path | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from triton_vlm.hub import hub_miss_reason, hub_offline, hub_reachable

    at = f" (revision {revision})" if revision != WeightsConfig.revision else ""
    flag = f" --revision {revision}" if at else ""
    # As the weights' loader does (triton_vlm.loading): without the Hub, read the cache at once instead of
    # waiting out huggingface_hub's retries.
    local_only = hub_offline() or not hub_reachable()
    try:
        return Path(hf_hub_download(model_id, "config.json", revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_only))
    except LocalEntryNotFoundError:
        raise LauncherError(f"cannot read the config.json of {model_id}{at}: {hub_miss_reason()}. Download the "
                            f"checkpoint where the Hub answers (`hf download {model_id}{flag}`; the Hugging Face "
                            "cache is then used offline too), or serve its directory") from None
    except GatedRepoError:
        raise LauncherError(f"{model_id} is gated on the Hub: accept its terms there and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise LauncherError(f"{model_id} is no model on the Hub (or a private one: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise LauncherError(f"{model_id} has no revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as exc:  # no config.json (EntryNotFoundError), network errors
        raise LauncherError(f"cannot read the config.json of {model_id}{at}: {exc}") from None


def unsupported_message(source: str, architectures: list[str], supported: Mapping[str, str]) -> str:
    """Why ``source`` has no family: what its config.json names, what is supported, and the ``auto`` way out."""
    named = ", ".join(architectures) if architectures else "no architectures"
    listed = ", ".join(f"{a} ({f})" for a, f in sorted(supported.items()))
    return (f"{source}: its config.json names {named}, which no family here serves; supported architectures: "
            f"{listed}. Any AutoModelForImageTextToText checkpoint with a chat template runs through the auto "
            "family (transformers' generate, no engine): pass --family auto")


def config_architectures(config: Mapping[str, Any]) -> list[str]:
    """The class names a config.json's ``architectures`` lists (transformers writes the model's class there)."""
    named = config.get("architectures")
    return [a for a in named if isinstance(a, str)] if isinstance(named, list) else []


def pick_family(source: str, config: Mapping[str, Any]) -> str:
    """The family for a checkpoint's config.json, by its ``architectures``; raises listing the supported ones."""
    from triton_vlm.models.registry import architecture_families, family_for_architectures

    architectures = config_architectures(config)
    family = family_for_architectures(architectures)
    if family is None:
        raise LauncherError(unsupported_message(source, architectures, architecture_families()))
    return family


def served_name(source: str) -> str:
    """The default served name: the last part of the hub id or directory (``llava-hf/llava-1.5-7b-hf`` ->
    ``llava-1.5-7b-hf``), with what a Triton model name may not hold replaced by ``-``."""
    name = _NOT_IN_NAME.sub("-", Path(source.rstrip("/\\")).name).lstrip("_.-")[:64].rstrip("_.-")
    if name.endswith("_stream"):  # names the engine models
        name = name.removesuffix("_stream") + "-stream"
    return name or "model"


def resolve_checkpoint(request: CheckpointRequest, cache_dir: Path | None = None) -> ServedCheckpoint:
    """Read the checkpoint's config.json and settle the entry: name, family, weights. The config is read even
    where the family is forced, so a checkpoint that cannot be had fails here, not on the first request."""
    directory = local_checkpoint(request.source)
    if directory is not None and request.revision != WeightsConfig.revision:
        raise LauncherError(f"--revision applies to Hugging Face ids; {request.source} is a directory")
    config = read_checkpoint_config(request.source, request.revision, cache_dir)
    if request.family:
        from triton_vlm.models import get_family

        family = get_family(request.family).name  # UnknownModelError lists the families
    else:
        family = pick_family(request.source, config)
    return ServedCheckpoint(name=request.name or served_name(request.source), family=family,
                            hf_model_id="" if directory else request.source, local_path=str(directory or ""),
                            revision=request.revision, architectures=tuple(config_architectures(config)))


def write_entry(repository: Path, checkpoint: ServedCheckpoint) -> Path:
    """Write ``checkpoint``'s model directory (config.pbtxt, 1/model.py) into ``repository``; returns it."""
    from triton_vlm.launcher.scaffold import add_model

    return add_model(repository, checkpoint.name, checkpoint.hf_model_id, family=checkpoint.family,
                     revision=checkpoint.revision, local_path=checkpoint.local_path, force=True)
