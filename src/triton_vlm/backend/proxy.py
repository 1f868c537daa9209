"""A light non-decoupled model that forwards each request to the decoupled ``<model>_stream`` model (BLS).

Triton's HTTP ``infer`` and gRPC ``ModelInfer`` refuse decoupled models, so on GPU hosts the public model becomes
this forwarder, with a few CPU instances. ``execute`` hands its batch to the engine and returns at once; each
request is answered through its own response sender (allowed for non-decoupled models since Triton 24.06: one
FINAL response per request) when the engine is done with it. So an instance takes the next batch right away, no
request waits for the slowest of its batch, and the engine batches everything continuously. It imports no torch.
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
        self._pending: set[asyncio.Future[None]] = set()

    async def execute(self, requests: list[Any]) -> None:
        # Hand every request to the engine and return: each answer goes back through its request's response
        # sender as soon as it is complete, so an instance is free for the next batch at once and no request
        # waits for the slowest of its batch. Known upstream: under heavy load async_exec's concurrent
        # decoupled calls at times crash Triton 2.51's stub (server#8922 reports the race in 2.70); the
        # supervisor then restarts what died. docs/reliability.md has the details.
        for request in requests:
            task = asyncio.ensure_future(self._answer(self._forward(request), request.get_response_sender()))
            self._pending.add(task)  # the event loop keeps only a weak reference to a task
            task.add_done_callback(self._pending.discard)
        return None

    async def _answer(self, forward: Any, sender: Any) -> None:
        try:
            response = self._collect(await forward.async_exec(decoupled=True))
        except Exception as exc:  # noqa: BLE001 - the client gets it as this request's error
            response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                f"forwarding to {self.target} failed: {exc}", pb_utils.TritonError.INTERNAL))
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _forward(self, request: Any) -> Any:
        # Copies: the request's own tensors are freed when execute() returns, before the call is sent.
        inputs = [pb_utils.Tensor(t.name(), t.as_numpy().copy()) for t in request.inputs() if t.name() != "stream"]
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
