"""triton-vlm's own generation engine: continuous batching over a preallocated KV cache.

    LLMEngine (engine.py)     background thread; step() = schedule -> launch -> read back the previous step
    ├── Scheduler (scheduler.py)  admits requests into KV slots, plans prefill chunks and decodes
    ├── ModelRunner (runner.py)   vision encoding, chunked prefill, decode (CUDA graphs on GPU), tokens on device
    │   ├── LlamaDecoder (llama.py), MoondreamDecoder (moondream.py), Kosmos2Decoder (kosmos2.py)  a family's
    │   │   forward over the slot cache, with attention.py (K/V writes + attention), kernels.py (fused Triton
    │   │   kernels, torch twins) and weights.py (fused projections in their fastest layout)
    │   └── GraphedVision (vision.py)  the vision tower as CUDA graphs at small batches (CLIP's quick_gelu fused)
    ├── SlotKVCache (kv_cache.py) one slot of max_model_len positions per running request
    ├── quantization.py           opt-in fp8: Llama projections (per-channel weights, per-token inputs), KV cache
    └── EngineAdapter (adapter.py)  what a model family provides
                                  (models/llava_engine.py, models/kosmos2_engine.py,
                                  models/moondream2/engine_adapter.py)
"""

from triton_vlm.config import EngineConfig
from triton_vlm.engine.engine import LLMEngine
from triton_vlm.engine.request import EngineRequest, RequestOutput

__all__ = ["EngineConfig", "EngineRequest", "LLMEngine", "RequestOutput"]
