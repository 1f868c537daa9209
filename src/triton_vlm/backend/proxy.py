"""A light non-decoupled model that forwards each request to the decoupled ``<model>_stream`` model (BLS).

Triton's HTTP ``infer`` and gRPC ``ModelInfer`` refuse decoupled models, so on GPU hosts the public model becomes
this forwarder, with a few CPU instances. ``execute`` hands its batch to the engine and returns at once; each
request is answered through its own response sender (allowed for non-decoupled models since Triton 24.06: one
FINAL response per request) when the engine is done with it. So an instance takes the next batch right away, no
request waits for the slowest of its batch, and the engine batches everything continuously. It imports no torch.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm.backend.stub_logging import configure_logging, quiet_teardown
from triton_vlm.error_tags import split_error_tag

#: Requests one instance keeps in flight to the engine: each holds a thread until its answer is in. Past it,
#: requests wait here instead of in the engine's scheduler, so it stays above any engine's ``max_num_seqs``.
MAX_IN_FLIGHT = 256


class ForwardingModel:
    def initialize(self, args: dict[str, str]) -> None:
        configure_logging()
        config = json.loads(args["model_config"])
        params = config.get("parameters") or {}
        self.target = params["forward_to"]["string_value"]
        self.outputs = [output["name"] for output in config["output"]]
        self._calls = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix=f"forward-{self.target}")

    def execute(self, requests: list[Any]) -> None:
        # Each call to the engine runs on a thread of our own, through the blocking exec(): Triton 2.51's
        # async_exec(decoupled=True) hands its worker thread a dangling reference to the stub, and under
        # concurrent calls the stub died of it (SIGSEGV; fixed upstream in python_backend#439, 2026-06).
        for request in requests:
            self._calls.submit(self._answer, self._forward(request), request.get_response_sender())
        return None

    def _answer(self, forward: Any, sender: Any) -> None:
        try:
            response = self._collect(forward.exec(decoupled=True))
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
        # Triton finalizes once no request is in flight; calls still queued (an engine that went away) are dropped.
        self._calls.shutdown(wait=False, cancel_futures=True)
        quiet_teardown()
