"""triton-vlm's own generation engine: continuous batching over a preallocated KV cache.

Generic machinery: it imports nothing from :mod:`triton_vlm.models`. A model family plugs in through the
interfaces of adapter.py, implemented in the family's own package (``models/<family>/engine_adapter.py``).

    LLMEngine (engine.py)     background thread; step() = schedule -> launch -> read back the previous step
    ├── Scheduler (scheduler.py)  admits requests into KV slots, plans prefill chunks and decodes
    ├── ModelRunner (runner.py)   vision encoding, chunked prefill, decode (CUDA graphs on GPU), tokens on device
    │   ├── a Decoder (adapter.py)  a language model's forward over the slot cache: the generic LlamaDecoder
    │   │   (decoders/llama.py), or a family's own (models/kosmos2/engine_decoder.py,
    │   │   models/moondream2/engine_decoder.py); built from attention.py (K/V writes + attention), kernels.py
    │   │   (fused Triton kernels, torch twins) and weights.py (fused projections in their fastest layout)
    │   └── GraphedVision (vision.py)  the vision tower as CUDA graphs at small batches (CLIP's quick_gelu fused)
    ├── SlotKVCache (kv_cache.py) one slot of max_model_len positions per running request
    ├── PrefixCache (prefix_cache.py)  which prompt blocks each slot holds: a repeated prefix is not prefilled again
    ├── quantization.py           opt-in fp8: Llama projections (per-channel weights, per-token inputs), KV cache
    └── EngineFamily, EngineAdapter (adapter.py)  what a model family provides (models/<family>/engine_adapter.py)
"""

from triton_vlm.config import EngineConfig
from triton_vlm.engine.engine import LLMEngine
from triton_vlm.engine.request import EngineRequest, RequestOutput

__all__ = ["EngineConfig", "EngineRequest", "LLMEngine", "RequestOutput"]
