"""Triton's protocol, in one private place: everything that talks to Triton goes through it.

- :mod:`.wire`: the encoding of an error's (code, param, message) inside the one message Triton carries, and of
  the ``token_logprobs`` and ``choices`` outputs (JSON); the backend encodes with it, and only this package
  decodes. Dependency-free.
- :mod:`.tensors`: request input tensors from typed request fields, for ``tritonclient.http``/``.grpc`` (and
  their ``.aio`` twins).
- :mod:`.results`: a response's outputs as a typed :class:`~.results.Output`.
- :mod:`.stream`: the gRPC single-request stream loop, once sync and once asyncio, with the cancel rule.
- :mod:`.errors`: every tritonclient / gRPC / HTTP error translated into :mod:`triton_vlm.errors`' tree.
- :mod:`.connect`: tritonclient's client objects.
- :mod:`.model_config`: ``config.pbtxt`` through Triton's protobuf schema.

This file imports nothing, so the backend (inside Triton's stub) can import :mod:`.wire` alone.
"""
