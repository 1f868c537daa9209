"""A light non-decoupled model that forwards each request to the decoupled ``<model>_stream`` model.

Triton's HTTP ``infer`` and gRPC ``ModelInfer`` refuse decoupled models, so on GPU hosts the public model becomes
this forwarder, with a few CPU instances. ``execute`` hands its batch to the engine and returns at once; each
request is answered through its own response sender (allowed for non-decoupled models since Triton 24.06: one
FINAL response per request) when the engine is done with it. So an instance takes the next batch right away, no
request waits for the slowest of its batch, and the engine batches everything continuously. It imports no torch.

The calls go to this same server over gRPC on the loopback, one stream per request, not through BLS: Triton
2.51's stub died of SIGSEGV under many concurrent decoupled BLS calls, from ``async_exec`` (whose callback
holds a dangling reference to the stub; python_backend#439) and from ``exec`` on threads alike
(docs/reliability.md). A request whose client cancels it (or whose deadline passes) has its stream cancelled,
which cancels it in the engine too. The stream loop, tensors and errors are :mod:`triton_vlm._protocol`'s; an
engine error is passed on with its code and request field (:mod:`triton_vlm._protocol.wire`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm._protocol.connect import make_client
from triton_vlm._protocol.stream import StreamCall, stream_async
from triton_vlm._protocol.tensors import input_tensors, requested_outputs
from triton_vlm._protocol.wire import encode_error
from triton_vlm.backend.stub_logging import configure_logging, quiet_teardown
from triton_vlm.config import string_parameters
from triton_vlm.errors import TritonVLMError

#: Where the forwarder finds the server when its config does not say (the launcher writes ``forward_grpc_url``).
DEFAULT_GRPC_URL = "127.0.0.1:8001"
#: How often an unanswered request asks Triton whether its client cancelled it: each question is an IPC round trip
#: that blocks the event loop all forwarded requests share, so not often (a cancelled request is stopped within it).
CANCEL_POLL_S = 1.0

log = logging.getLogger("triton_vlm")


class ForwardingModel:
    def initialize(self, args: dict[str, str]) -> None:
        configure_logging()
        config = json.loads(args["model_config"])
        params = string_parameters(config.get("parameters"))
        self.name = config.get("name", "?")
        self.target = params["forward_to"]
        self.url = params.get("forward_grpc_url") or DEFAULT_GRPC_URL
        self.outputs = [output["name"] for output in config["output"]]
        self._client: Any = None  # made in the stub's event loop, at the first execute()
        self._pending: set[asyncio.Future[None]] = set()

    async def execute(self, requests: list[Any]) -> None:
        if self._client is None:
            self._client = make_client("grpc.aio", self.url)
        for request in requests:
            task = asyncio.ensure_future(self._answer(self._inputs(request), request.get_response_sender()))
            self._pending.add(task)  # the event loop keeps only a weak reference to a task
            task.add_done_callback(self._pending.discard)
        return None

    def _inputs(self, request: Any) -> list[Any]:
        # Serialized here: the request's own tensors are freed when execute() returns, before the call is sent.
        arrays = [(t.name(), t.as_numpy()) for t in request.inputs() if t.name() != "stream"]
        return input_tensors("grpc.aio", [*arrays, ("stream", np.array([[False]], dtype=np.bool_))])

    async def _answer(self, inputs: list[Any], sender: Any) -> None:
        call = asyncio.ensure_future(self._call(inputs))
        while not call.done():
            await asyncio.wait({call}, timeout=CANCEL_POLL_S)
            if not call.done() and _client_left(sender):
                # Cancelling the task cancels its gRPC stream, and with it the request in the engine.
                call.cancel()
                await asyncio.wait({call})
                log.info("model %r: request cancelled by its client; cancelled in %s too", self.name, self.target)
        failure = None if call.cancelled() else call.exception()
        if call.cancelled():
            response = _error_response("CANCELLED", "cancelled by the client")
        elif isinstance(failure, TritonVLMError):  # the engine's error (or the way to it failed): passed on
            response = _error_response(failure.code, str(failure), failure.param)
        elif failure is not None:  # the client gets it as this request's error
            response = _error_response("INTERNAL", f"forwarding to {self.target} failed: {failure}")
        else:
            response = call.result()
        try:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # a client that left may take no answer
            log.debug("answer not delivered", exc_info=True)

    async def _call(self, inputs: list[Any]) -> Any:
        """The engine's answer as this request's response; its error is raised (the project's error tree)."""
        call = StreamCall(self.target, inputs, requested_outputs("grpc.aio", self.outputs))
        final = None
        async for result in stream_async(self._client, call, url=self.url):
            final = result  # the whole answer comes in one response (the stream input is False)
        if final is None:
            return _error_response("CANCELLED", f"{self.target} ended the request without an answer (cancelled?)")
        arrays = [(name, final.as_numpy(name)) for name in self.outputs]
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, array) for name, array in arrays
                                                          if array is not None])

    def finalize(self) -> None:
        quiet_teardown()


def _client_left(sender: Any) -> bool:
    """Whether Triton says the request was cancelled (its client gave up or its deadline passed)."""
    try:
        return bool(sender.is_cancelled())
    except Exception:  # noqa: BLE001 - an unanswerable question is not a cancellation
        log.debug("is_cancelled failed", exc_info=True)
        return False


def _error_response(code: str, message: str, param: str | None = None) -> Any:
    """A request's error response: Triton's code for plain infer callers, all of it encoded in the message."""
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
        encode_error(code, message, param), getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL)))
