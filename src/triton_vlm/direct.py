"""In-process ("direct") inference with the same settings the server would use, and no Triton."""

from __future__ import annotations

from pathlib import Path

import torch

from triton_vlm.client.client import ImageLike, encode_image
from triton_vlm.config import read_config_file, read_settings
from triton_vlm.errors import TritonVLMError
from triton_vlm.launcher.repository import default_model_repository
from triton_vlm.models.generation import GenerationOutput
from triton_vlm.runtime import VLMRuntime


def direct_runtime(model: str, *, tiny: bool = False, repository: Path | None = None,
                   device: str | None = None) -> VLMRuntime:
    """A :class:`VLMRuntime` configured from ``<repository>/<model>/config.pbtxt`` plus the environment,
    exactly as the Triton backend configures it. ``device`` defaults to the first GPU, else the CPU."""
    from triton_vlm.errors import UnknownModelError

    repository = repository or default_model_repository()
    config = repository / model / "config.pbtxt"
    if not config.is_file():
        raise UnknownModelError(f"model {model!r} not found in {repository}")
    settings = read_settings(*read_config_file(config))
    if tiny:
        settings = settings.with_overrides(tiny=True)
    if device is None:
        resolved = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        resolved = torch.device(device)
    return VLMRuntime(settings, resolved)


def direct_infer(runtime: VLMRuntime, image: ImageLike, prompt: str, *, task: str | None = None,
                 max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, ignore_eos: bool = False) -> GenerationOutput:
    """One request through ``runtime``; raises the request's :class:`TritonVLMError` if it fails."""
    request = runtime.make_request(encode_image(image), prompt, task=task, max_tokens=max_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed, ignore_eos=ignore_eos)
    (result,) = runtime.generate([request])
    if isinstance(result, TritonVLMError):
        raise result
    return result
