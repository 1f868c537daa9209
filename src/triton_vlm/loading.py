"""Find and load weights: tiny checkpoint, a local directory, or a Hugging Face id (cached or downloaded)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from triton_vlm.config import ModelSettings, env_prefix
from triton_vlm.errors import ModelLoadError
from triton_vlm.hub import hub_endpoint, hub_miss_reason, hub_offline, hub_reachable
from triton_vlm.models import ModelFamily, get_family

log = logging.getLogger("triton_vlm")


@dataclass
class LoadedModel:
    family: ModelFamily
    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    source: str
    load_seconds: float


def resolve_device(settings: ModelSettings, instance_kind: str = "CPU", device_id: int = 0) -> torch.device:
    """``device=auto`` follows the Triton instance: a GPU instance uses its GPU, anything else the CPU."""
    if settings.weights.device != "auto":
        return torch.device(settings.weights.device)
    if instance_kind.upper() == "GPU" and torch.cuda.is_available():
        return torch.device("cuda", device_id)
    return torch.device("cpu")


def resolve_dtype(settings: ModelSettings, device: torch.device, family: ModelFamily | None = None) -> torch.dtype:
    """``dtype=auto``: float32 on CPU; on GPU the family's :attr:`~ModelFamily.auto_cuda_dtype` (float16)."""
    if settings.weights.dtype != "auto":
        return getattr(torch, settings.weights.dtype)
    if device.type != "cuda":
        return torch.float32
    return getattr(torch, family.auto_cuda_dtype) if family is not None else torch.float16


def load_model(settings: ModelSettings, device: torch.device) -> LoadedModel:
    """Load model and processor for ``settings`` on ``device``; every failure is a :class:`ModelLoadError`
    whose message names the weights and how to provide them."""
    family = get_family(settings.family)
    if not family.supported:
        raise ModelLoadError(f"model {settings.model_name!r}: family {family.name!r} cannot be served yet")
    dtype = resolve_dtype(settings, device, family)
    _quiet_transformers()
    try:
        source, revision, local_only = _weights_source(settings, family)
    except ModelLoadError:
        raise
    except Exception as exc:  # e.g. building the tiny checkpoint failed (disk full, read-only cache)
        raise ModelLoadError(f"model {settings.model_name!r}: cannot prepare the weights "
                             f"({type(exc).__name__}: {_first_line(exc)})") from exc
    started = time.perf_counter()
    try:
        model, processor = family.load(source, revision=revision, dtype=dtype, device=device,
                                       local_files_only=local_only,
                                       trust_remote_code=settings.weights.trust_remote_code)
    except ModelLoadError:
        raise
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(f"model {settings.model_name!r}: out of GPU memory loading {source} ({exc})") from exc
    except Exception as exc:  # missing files (OSError), bad config (ValueError), corrupt weights (SafetensorError)...
        raise ModelLoadError(_load_failure_message(settings, source, revision, exc)) from exc
    seconds = time.perf_counter() - started
    log.info("loaded model %s (%s from %s) on %s as %s in %.1fs", settings.model_name, family.name, source,
             device, str(dtype).removeprefix("torch."), seconds)
    return LoadedModel(family, model, processor, device, dtype, source, seconds)


def _quiet_transformers() -> None:
    # Progress bars and backend notices would land in Triton's log (and the CLI's stderr) on every load.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _weights_source(settings: ModelSettings, family: ModelFamily) -> tuple[str, str | None, bool]:
    if settings.weights.tiny:
        from triton_vlm.tiny import ensure_tiny_checkpoint

        variant = family.tiny_variant(settings.weights.hf_model_id or family.default_hf_model_id)
        path = ensure_tiny_checkpoint(family.name, variant=variant) if variant else ensure_tiny_checkpoint(family.name)
        return str(path), None, True
    if settings.weights.local_path:
        path = Path(settings.weights.local_path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model {settings.model_name!r}: local_path {str(path)!r} is not a checkpoint directory "
                "(no config.json). Point it at a directory made by save_pretrained or `hf download ID --local-dir DIR`."
            )
        return str(path), None, True
    model_id = settings.weights.hf_model_id or family.default_hf_model_id
    local_only = hub_offline()
    if not local_only and not hub_reachable():
        log.warning("model %s: the Hugging Face Hub (%s) cannot be reached; loading %s from the local cache only",
                    settings.model_name, hub_endpoint(), model_id)
        local_only = True
    return model_id, settings.weights.revision or None, local_only


def _revision_flag(revision: str | None) -> str:
    """`` --revision R`` for the download command (huggingface_hub's ``hf``; the older CLI name is gone), where
    a revision is pinned."""
    return f" --revision {revision}" if revision and revision != "main" else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def _is_corrupt(exc: BaseException) -> bool:
    """Whether ``exc`` says the weight files are there but unreadable (truncated, not safetensors)."""
    return type(exc).__name__ == "SafetensorError" or isinstance(exc, EOFError) or "deserializ" in str(exc)


def _pickle_weights_only(directory: Path) -> bool:
    """Whether ``directory`` holds pickle weights (pytorch_model*.bin, *.pt, *.pth) and no safetensors."""
    if not directory.is_dir():
        return False
    names = [p.name for p in directory.iterdir()]
    pickled = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) and "tokenizer" not in n for n in names)
    return pickled and not any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names)


def _load_failure_message(settings: ModelSettings, source: str, revision: str | None, exc: BaseException) -> str:
    """Why loading ``source`` failed and what to do: about the directory for a tiny or local checkpoint,
    about the hub (cache, offline mode, download) for a hub id."""
    cause = f"Cause: {type(exc).__name__}: {_first_line(exc)}"
    corrupt = _is_corrupt(exc)
    if settings.weights.tiny:
        return (f"model {settings.model_name!r}: the tiny checkpoint {source!r} cannot be loaded"
                f"{' (corrupt or incomplete files)' if corrupt else ''}; delete that directory and it is rebuilt "
                f"on the next load. {cause}")
    if settings.weights.local_path and _pickle_weights_only(Path(source)):
        return (
            f"model {settings.model_name!r}: the checkpoint in local_path {source!r} has its weights only as "
            f"pickle files (*.bin / *.pt); triton-vlm loads safetensors only, because unpickling a file can run "
            f"code hidden in it. Convert it once where you trust the file (load it and call "
            f"save_pretrained(path, safe_serialization=True)), or use the model's safetensors release. {cause}"
        )
    if settings.weights.local_path:
        what = ("its weights are corrupt or incomplete (an interrupted copy?)" if corrupt else
                "it does not hold a complete, loadable checkpoint")
        return (
            f"model {settings.model_name!r}: cannot load the checkpoint in local_path {source!r}: {what}. "
            f"The directory needs config.json, the processor/tokenizer files and model.safetensors (or "
            f"sharded safetensors with their index), as written by save_pretrained. Fix or replace it, or set "
            f"{env_prefix(settings.model_name)}LOCAL_PATH (or the local_path parameter) to another checkpoint "
            f"directory. {cause}"
        )
    if corrupt:
        return (
            f"model {settings.model_name!r}: the cached weights of {source!r} (revision {revision or 'default'}) "
            f"are corrupt or incomplete (an interrupted download?). Download them again with "
            f"`hf download {source}{_revision_flag(revision)} --force-download` (cache in HF_HOME, "
            f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}). {cause}"
        )
    return _missing_weights_message(settings, source, revision, exc)


def _missing_weights_message(settings: ModelSettings, source: str, revision: str | None,
                             exc: BaseException) -> str:
    """Hub weights not found: offline without a cached copy, or the hub unreachable. For a tiny or local
    checkpoint (``source`` is a directory, not a hub id) the message is about that directory instead."""
    if settings.weights.local_path or settings.weights.tiny:
        return _load_failure_message(settings, source, revision, exc)
    return (
        f"model {settings.model_name!r}: cannot load weights {source!r} (revision {revision or 'default'}): "
        f"{hub_miss_reason()}. Provide them by one of: (1) on a connected machine run "
        f"`hf download {source}{_revision_flag(revision)}` and copy the cache to HF_HOME "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); (2) set {env_prefix(settings.model_name)}"
        f"LOCAL_PATH (or the local_path parameter) to a checkpoint directory; (3) use --tiny for test weights. "
        f"Cause: {type(exc).__name__}: {_first_line(exc)}"
    )
