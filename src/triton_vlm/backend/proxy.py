"""A light non-decoupled model that forwards each request to the decoupled ``<model>_stream`` model (BLS).

Triton's HTTP ``infer`` and gRPC ``ModelInfer`` refuse decoupled models, and a non-decoupled model runs one
``execute`` at a time per instance. So on GPU hosts the public model becomes this forwarder, with several
CPU instances: each instance hands its whole batch to the engine at once, the engine batches everything
continuously, and plain ``infer`` clients get the engine's throughput. It imports no torch.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm.backend.stub_logging import configure_logging, quiet_teardown
from triton_vlm.error_tags import split_error_tag


class ForwardingModel:
    def initialize(self, args: dict[str, str]) -> None:
        configure_logging()
        config = json.loads(args["model_config"])
        params = config.get("parameters") or {}
        self.target = params["forward_to"]["string_value"]
        self.outputs = [output["name"] for output in config["output"]]

    async def execute(self, requests: list[Any]) -> list[Any]:
        # Issue every request before waiting on any, so the whole batch reaches the engine together. (A plain
        # exec(decoupled=True) per request would wait for each answer in turn.) Known upstream: under heavy load
        # async_exec's concurrent decoupled calls at times crash Triton 2.51's stub (server#8922 reports the
        # race in 2.70); the supervisor then restarts what died. docs/reliability.md has the details.
        streams = await asyncio.gather(*(self._forward(r).async_exec(decoupled=True) for r in requests))
        return [self._collect(stream) for stream in streams]

    def _forward(self, request: Any) -> Any:
        inputs = [pb_utils.Tensor(t.name(), t.as_numpy()) for t in request.inputs() if t.name() != "stream"]
        inputs.append(pb_utils.Tensor("stream", np.array([[False]], dtype=np.bool_)))
        return pb_utils.InferenceRequest(model_name=self.target, inputs=inputs,
                                         requested_output_names=self.outputs)

    def _collect(self, responses: Any) -> Any:
        final = None
        for response in responses:
            if response.has_error():
                code, message = split_error_tag(response.error().message())
                return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    message, getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL)))
            if response.output_tensors():
                final = response
        if final is None:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                f"{self.target} ended the request without an answer (cancelled?)", pb_utils.TritonError.CANCELLED))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(t.name(), t.as_numpy())
                                                          for t in final.output_tensors()])

    def finalize(self) -> None:
        quiet_teardown()
