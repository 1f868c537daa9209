"""triton-vlm's own generation engine: continuous batching over a preallocated KV cache.

    LLMEngine (engine.py)     background thread; step() = schedule -> execute -> update
    ├── Scheduler (scheduler.py)  admits requests into KV slots, plans prefill chunks and decodes
    ├── ModelRunner (runner.py)   vision encoding, chunked prefill, decode (CUDA graphs on GPU), sampling
    │   └── LlamaDecoder (llama.py)  the language model's forward over the slot cache
    └── SlotKVCache (kv_cache.py) one slot of max_model_len positions per running request
"""

from triton_vlm.engine.config import EngineConfig
from triton_vlm.engine.engine import LLMEngine
from triton_vlm.engine.request import EngineRequest, RequestOutput

__all__ = ["EngineConfig", "EngineRequest", "LLMEngine", "RequestOutput"]
