"""Whether a model's weights can be had on this machine, asked before any load.

Triton reports a model READY once its ``initialize`` ran, weights or not (they load on the first request). A model
whose weights are neither in a ``local_path``, nor in the Hugging Face cache, nor downloadable (offline, or the Hub
out of reach) answers every request with an error. The launcher says which models are in that state when it
starts, and the backend exports it as ``triton_vlm_model_weights_available`` for ``triton-vlm status``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from triton_vlm.config import ModelSettings, env_prefix
from triton_vlm.hub import hub_miss_reason, hub_offline, hub_reachable


@dataclass(frozen=True)
class WeightsAvailability:
    """``where`` the weights come from: ``tiny``, ``local_path``, ``cache`` (the HF cache), ``hub`` (downloaded
    on the first load), or ``missing`` (``reason`` says why); ``source``: the hub id or directory."""

    model: str
    where: str
    source: str = ""
    reason: str = ""

    @property
    def detail(self) -> str:
        return f"{self.source}: {self.reason}" if self.reason else self.source

    @property
    def available(self) -> bool:
        return self.where != "missing"


def weights_availability(settings: ModelSettings, default_hf_model_id: str = "",
                         hub_answers: Callable[[], bool] = hub_reachable) -> WeightsAvailability:
    """Where ``settings``' weights would come from. Reads the disk only, plus one Hub probe (``hub_answers``,
    up to 3 s) where the weights are in no cache and the Hub is not off."""
    name, weights = settings.model_name, settings.weights
    if weights.tiny:
        return WeightsAvailability(name, "tiny")
    if weights.local_path:
        path = Path(weights.local_path).expanduser()
        if (path / "config.json").is_file():
            return WeightsAvailability(name, "local_path", str(path))
        return WeightsAvailability(name, "missing", str(path), "this local_path has no config.json")
    model_id = weights.hf_model_id or default_hf_model_id
    if not model_id:
        return WeightsAvailability(name, "missing", "", "no hf_model_id and no local_path")
    if _in_hf_cache(model_id, weights.revision or None):
        return WeightsAvailability(name, "cache", model_id)
    if not hub_offline() and hub_answers():
        return WeightsAvailability(name, "hub", model_id)
    return WeightsAvailability(name, "missing", model_id, hub_miss_reason())


def hf_hub_cache() -> str:
    """The Hugging Face cache the environment names now, resolved as huggingface_hub does (which reads it once,
    at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _in_hf_cache(model_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(model_id, "config.json", revision=revision, cache_dir=hf_hub_cache())
    except Exception:  # a malformed id or cache entry: the load itself will say what is wrong
        return False
    return isinstance(found, str)


def missing_weights_note(missing: list[WeightsAvailability]) -> str:
    """What the launcher prints at start when some models have no weights here: which, why, and the three
    ways to give them weights."""
    by_source: dict[tuple[str, str], list[str]] = {}
    for found in missing:
        by_source.setdefault((found.source, found.reason), []).append(found.model)
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    lines = [f"no weights here for {', '.join(m.model for m in missing)}: Triton reports them READY, but every "
             f"request to them fails until their weights are there."]
    lines += [f"  {', '.join(models)}: {source or '-'}: {reason}" for (source, reason), models in by_source.items()]
    lines += [
        "Provide them in one of three ways:",
        "  1. let the server download them: network access to the Hugging Face Hub (HF_HUB_OFFLINE unset; "
        "HF_TOKEN for gated models); they load on the first request, or at start with --preload",
        f"  2. download them beforehand into the Hugging Face cache (HF_HOME, {hf_home}): `hf download "
        f"<hf_model_id>`, e.g. on a connected machine, then copy the cache here",
        f"  3. point a model at a checkpoint directory: {env_prefix(missing[0].model)}LOCAL_PATH=/path/to/checkpoint "
        f"(or the local_path parameter in its config.pbtxt)",
        "Or serve tiny random-weight test checkpoints: --tiny. Serve fewer models: --models.",
    ]
    return "\n".join(lines)


def repository_availability(repository: Path, models: list[str],
                            hub_answers: Callable[[], bool] = hub_reachable) -> list[WeightsAvailability]:
    """:func:`weights_availability` of each of ``models`` in ``repository`` (config.pbtxt, then the
    ``TRITON_VLM_<MODEL>_*`` overrides), the Hub probed at most once."""
    import functools

    from triton_vlm.launcher.repository import model_family, model_settings
    from triton_vlm.models import get_family

    probe = functools.cache(hub_answers)
    found = []
    for model in models:
        family = get_family(model_family(repository, model))
        if not family.supported:
            continue
        found.append(weights_availability(model_settings(repository, model), family.default_hf_model_id, probe))
    return found
