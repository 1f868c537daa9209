"""The settings of one served model: frozen, typed sections, validated on construction.

These dataclasses hold the ONLY defaults. Every field is a key of the same name: a model's ``config.pbtxt`` sets
it as a ``parameters`` entry (only where it differs from the default here), and ``TRITON_VLM_<MODEL>_<KEY>``
overrides it (:mod:`triton_vlm.config.reader`).

    ModelSettings        what a model's stub loads with: model_name, family (key: model_family), base_model
    ├── weights: WeightsConfig   which checkpoint, where from, in what precision, on which device
    ├── limits: RequestLimits    what one request may ask for and send
    └── engine: EngineConfig     the engine of a ``<model>_stream`` model (triton_vlm.engine)
    BatchingConfig       Triton's queue and batching delay, which the launcher writes into a rendered config
                         (launcher/policies.py); from the environment only: in config.pbtxt they are Triton's own
                         ``dynamic_batching`` fields.

``max_queue_size`` is a key of both EngineConfig (the engine's own bound) and BatchingConfig (Triton's queue
policy of a batched model): ``TRITON_VLM_LLAVA_MAX_QUEUE_SIZE`` bounds llava's queue and llava_stream's engine.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from triton_vlm.errors import InvalidInputError

DTYPES = ("auto", "float32", "float16", "bfloat16")
#: Values of :attr:`EngineConfig.quantization` and :attr:`EngineConfig.kv_cache_dtype` (see engine.quantization).
QUANTIZATIONS = ("none", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ConfigError(InvalidInputError):
    """A setting that cannot be used: a bad value or an unknown key. Raised while a model loads (or the launcher
    renders it), never for a request; :attr:`key` names the setting, :attr:`source` where its value came from
    (``parameter 'dtype'``, ``TRITON_VLM_LLAVA_DTYPE``; None: the default, or a value given in code)."""

    def __init__(self, message: str, *, key: str, source: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.source = source


def _at_least(section: object, key: str, low: float, why: str = "") -> None:
    value = getattr(section, key)
    if not value >= low:  # also refuses NaN
        raise ConfigError(f"{key} must be >= {low:g}{why}, got {value!r}", key=key)


def _positive(section: object, key: str) -> None:
    if not getattr(section, key) > 0:
        raise ConfigError(f"{key} must be positive, got {getattr(section, key)!r}", key=key)


def _one_of(section: object, key: str, choices: tuple[str, ...]) -> None:
    value = getattr(section, key)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}", key=key)


@dataclass(frozen=True)
class WeightsConfig:
    """Which checkpoint a model serves and how it is loaded (triton_vlm.loading)."""

    #: Hugging Face model id; "": the family's default checkpoint.
    hf_model_id: str = ""
    #: Hub revision (branch, tag or commit) of ``hf_model_id``.
    revision: str = "main"
    #: A checkpoint directory on disk; wins over ``hf_model_id`` (the hub is never asked).
    local_path: str = ""
    #: auto: float32 on CPU, the family's release precision (float16, moondream2 bfloat16) on GPU.
    dtype: str = "auto"
    #: auto: the Triton instance's device (KIND_GPU: its GPU; else the CPU); or cpu, cuda, cuda:N.
    device: str = "auto"
    #: Load the weights while the model loads (before the server is ready) instead of on the first request.
    preload: bool = False
    #: Run code shipped with the checkpoint (none of the served families needs it).
    trust_remote_code: bool = False
    #: Serve the project's tiny random-weight checkpoint of the architecture (tests); TRITON_VLM_TINY=1 for all.
    tiny: bool = False

    def __post_init__(self) -> None:
        _one_of(self, "dtype", DTYPES)
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}", key="device")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for and send (docs/reliability.md); a request over a limit gets INVALID_ARG."""

    #: Tokens generated when a request names no max_tokens.
    default_max_tokens: int = 128
    #: The most tokens a request may ask for.
    max_tokens_limit: int = 1024
    #: The longest prompt, in characters (the token limit is the model's context, checked when it is encoded).
    max_prompt_chars: int = 16_000
    #: Encoded image bytes.
    max_image_bytes: int = 20 * 1024 * 1024
    #: Decoded pixels, checked from the image header before decoding (so decompression bombs never expand).
    max_image_pixels: int = 40_000_000
    #: Width:height either way, also from the header (1 x 40000 strips never expand).
    max_image_aspect_ratio: float = 100.0

    def __post_init__(self) -> None:
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ConfigError("need 1 <= default_max_tokens <= max_tokens_limit, got "
                              f"{self.default_max_tokens} and {self.max_tokens_limit}", key="default_max_tokens")
        for key in ("max_prompt_chars", "max_image_bytes", "max_image_pixels"):
            _positive(self, key)
        _at_least(self, "max_image_aspect_ratio", 1)


@dataclass(frozen=True)
class BatchingConfig:
    """Triton's queue and batching delay for a batched model, which the launcher writes into its
    ``dynamic_batching`` (launcher/policies.py says why none is set by default). None: as its config.pbtxt says,
    unless the launcher's --max-queue-size, --queue-timeout-ms or --batch-delay-us set one for every model."""

    #: Requests that may wait; more are refused at once with UNAVAILABLE. 0: no bound.
    max_queue_size: int | None = None
    #: How long a request may wait in the queue (a request may ask for less with its ``timeout``). 0: no limit.
    queue_timeout_ms: int | None = None
    #: How long the first request of a batch may wait for company, in µs.
    batch_delay_us: int | None = None

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            if getattr(self, item.name) is not None:
                _at_least(self, item.name, 0)


@dataclass(frozen=True)
class EngineConfig:
    """The engine of a ``<model>_stream`` model (triton_vlm.engine and the stream backend in front of it)."""

    #: Longest sequence (prompt incl. image tokens + generated) a request may reach.
    max_model_len: int = 2048
    #: Upper bound on concurrently running requests; the KV cache may allow fewer. Also the derived
    #: ``<model>_stream`` config's max_batch_size (execute() only enqueues).
    max_num_seqs: int = 64
    #: Requests that may wait in the engine beyond the max_num_seqs it runs; more are refused at once with
    #: UNAVAILABLE. 0: no bound. (Not Triton's queue policy: in Triton 2.51 one turns payload prefetching off.)
    max_queue_size: int = 256
    #: Prompt tokens prefilled per engine step; longer prompts are chunked so decodes keep flowing. Smaller: shorter
    #: steps (first tokens and inter-token gaps under load), at some throughput (bench/README.md).
    max_prefill_tokens: int = 4096
    #: Share of free device memory (after weights) the KV cache may take.
    kv_cache_memory_fraction: float = 0.85
    #: Capture decode steps as CUDA graphs (GPU only).
    cuda_graphs: bool = True
    #: Decode-graph length buckets are multiples of this many positions.
    graph_len_step: int = 256
    #: "fp8": the language model's projections in fp8 with per-channel scales (Llama-family decoders, GPUs with
    #: fp8 tensor cores). Changes outputs slightly; bench/README.md has what it buys.
    quantization: str = "none"
    #: "fp8": K/V stored as fp8 (half the cache's memory and decode attention's reads); "auto": the model's dtype.
    kv_cache_dtype: str = "auto"
    #: Streamed deltas: the first token at once, then one response per this many new tokens (and the last). Each
    #: response is an IPC hop to Triton and a message to the client: under load a few tokens a delta buy throughput.
    stream_interval: int = 1
    #: Reuse the K/V (and skip the vision tower) of a prompt's leading part where an earlier request left them: a
    #: follow-up turn about the same image prefills only what is new. Cached blocks live in idle KV slots.
    prefix_caching: bool = True
    #: Positions per prefix-cache block: prefixes are matched in whole blocks.
    prefix_block_size: int = 16
    #: Prompt chunks of at most this many positions (up to 128), all text, run as decode rows of their slot, from
    #: CUDA graphs (so GPUs only): a chat's later turn then skips the host's launches of an eager prefill (on an
    #: H100 about 20 ms for llava, whatever the chunk's length). 0: off, the default until it is measured there.
    prefill_rows_max: int = 0
    #: MB of recently seen images kept by the digest of their file, twice: decoded (the model's requests, batched
    #: or on the engine) and through the processor (the engine's one-image requests). A chat resends its image every
    #: turn; a kept one skips the decode and the processor, milliseconds of the turn's first token. 0: off.
    image_cache_mb: int = 256
    #: Threads that read, decode and process requests for the engine (``engine.prepare``: the image processor runs
    #: there), so a burst of requests is prepared side by side instead of one after another (PIL and NumPy let go of
    #: the GIL). A processor that tiles a large image bounds the request rate otherwise: SmolVLM's takes ~150 ms a
    #: request on one CPU core. They take cores from the engine's own thread: 0 (the default) is a quarter of the
    #: cores this process may use, 1 to 4 (1 below 8 cores: the engine's thread then runs on the CPU too, or shares
    #: too few cores). 1: on the engine service's own thread.
    prepare_workers: int = 0

    def prepare_threads(self) -> int:
        """:attr:`prepare_workers` on this host (0 resolved from the cores this process may use)."""
        if self.prepare_workers:
            return self.prepare_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(4, cores // 4))

    def __post_init__(self) -> None:
        for key, low in (("max_model_len", 16), ("max_num_seqs", 1), ("max_prefill_tokens", 16),
                         ("graph_len_step", 16), ("stream_interval", 1), ("prefix_block_size", 1)):
            _at_least(self, key, low)
        _at_least(self, "max_queue_size", 0, " (0: no bound)")
        _at_least(self, "image_cache_mb", 0, " (0: off)")
        _at_least(self, "prefill_rows_max", 0, " (0: off)")
        _at_least(self, "prepare_workers", 0, " (0: by the host's cores)")
        fraction = self.kv_cache_memory_fraction
        if not 0.05 <= fraction <= 0.98:
            raise ConfigError(f"kv_cache_memory_fraction must be in [0.05, 0.98], got {fraction!r}",
                              key="kv_cache_memory_fraction")
        _one_of(self, "quantization", QUANTIZATIONS)
        _one_of(self, "kv_cache_dtype", KV_CACHE_DTYPES)


@dataclass(frozen=True)
class ModelSettings:
    """Everything needed to load and run one served model; built by :func:`triton_vlm.config.read_settings`."""

    #: The sections, by attribute name; each field of a section is a key of the same name.
    SECTIONS: ClassVar[dict[str, type]] = {"weights": WeightsConfig, "limits": RequestLimits, "engine": EngineConfig}

    model_name: str
    #: The adapter that serves it (triton_vlm.models registry); key ``model_family``.
    family: str
    #: For an engine model (``<model>_stream``): the public model whose weights and settings it serves.
    base_model: str = ""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not self.family.strip():
            raise ConfigError(f"model {self.model_name!r}: parameter 'model_family' is required", key="model_family")

    @classmethod
    def section_of(cls, key: str) -> str | None:
        """The section that has ``key``; None for a key of none."""
        return next((name for name, section in cls.SECTIONS.items()
                     if any(item.name == key for item in dataclasses.fields(section))), None)

    def with_overrides(self, **changes: Any) -> ModelSettings:
        """A copy with settings changed by key (``tiny=True``, ``max_num_seqs=4``), validated as on construction."""
        top = {key: changes.pop(key) for key in ("model_name", "family", "base_model") if key in changes}
        sections: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            name = self.section_of(key)
            if name is None:
                raise ConfigError(f"model {self.model_name!r}: unknown setting {key!r}", key=key)
            sections.setdefault(name, {})[key] = value
        replaced = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, **top, **replaced)
