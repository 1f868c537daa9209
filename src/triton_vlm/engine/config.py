"""Engine configuration: frozen, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from triton_vlm.errors import InvalidInputError

#: Values of :attr:`EngineConfig.quantization` and :attr:`EngineConfig.kv_cache_dtype` (see engine.quantization).
QUANTIZATIONS = ("none", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class EngineConfig:
    #: Longest sequence (prompt incl. image tokens + generated) a request may reach.
    max_model_len: int = 2048
    #: Upper bound on concurrently running requests; the KV cache may allow fewer.
    max_num_seqs: int = 64
    #: Prompt tokens prefilled per engine step; longer prompts are chunked so decodes keep flowing. Smaller: shorter
    #: steps (first tokens and inter-token gaps under load), at some throughput (bench/README.md).
    max_prefill_tokens: int = 4096
    #: Share of free device memory (after weights) the KV cache may take.
    kv_cache_memory_fraction: float = 0.85
    #: Capture decode steps as CUDA graphs (GPU only).
    cuda_graphs: bool = True
    #: Decode-graph length buckets are multiples of this many positions.
    graph_len_step: int = 256
    #: "fp8": the language model's projections in fp8 with per-channel scales (Llama-family decoders).
    quantization: str = "none"
    #: "fp8": K/V stored as fp8 (half the cache's memory and decode attention's reads); "auto": the model's dtype.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.max_model_len < 16:
            raise InvalidInputError("engine: max_model_len must be >= 16")
        if self.max_num_seqs < 1:
            raise InvalidInputError("engine: max_num_seqs must be >= 1")
        if self.max_prefill_tokens < 16:
            raise InvalidInputError("engine: max_prefill_tokens must be >= 16")
        if not 0.05 <= self.kv_cache_memory_fraction <= 0.98:
            raise InvalidInputError("engine: kv_cache_memory_fraction must be in [0.05, 0.98]")
        if self.graph_len_step < 16:
            raise InvalidInputError("engine: graph_len_step must be >= 16")
        if self.quantization not in QUANTIZATIONS:
            raise InvalidInputError(f"engine: quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidInputError(
                f"engine: kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
