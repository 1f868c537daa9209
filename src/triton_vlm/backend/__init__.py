"""Triton Python-backend glue. Importable only inside Triton's stub (it needs ``triton_python_backend_utils``).

- ``TritonVLMModel`` (python_model.py): one batched HF generation per ``execute`` (the CPU default).
- ``TritonVLMStreamModel`` (stream_model.py): the decoupled ``<model>_stream`` model, on the engine; its parts are
  the engine service (engine_service.py), the response loop (responses.py) and the batched tasks
  (batched_tasks.py), with a request's life from admission to FINAL in stream_requests.py.
- ``ForwardingModel`` (proxy.py): the public model on engine hosts, forwarding to ``<model>_stream``.

Imports are lazy so the forwarding model's processes never load torch.
"""

from typing import Any

__all__ = ["ForwardingModel", "TritonVLMModel", "TritonVLMStreamModel"]


def __getattr__(name: str) -> Any:
    if name == "TritonVLMModel":
        from triton_vlm.backend.python_model import TritonVLMModel

        return TritonVLMModel
    if name == "TritonVLMStreamModel":
        from triton_vlm.backend.stream_model import TritonVLMStreamModel

        return TritonVLMStreamModel
    if name == "ForwardingModel":
        from triton_vlm.backend.proxy import ForwardingModel

        return ForwardingModel
    raise AttributeError(name)
