"""A streamed request's time to first token, phase by phase: where a first token's milliseconds go.

The engine model (``<model>_stream``) stamps each request on its way (``time.perf_counter()``, one process) and
exports the phases as ``triton_vlm_first_token_phase_seconds{phase}``; its debug line names them too. They add up
to the time from Triton handing the request to the model to the first response leaving it:

- ``wait``: in the engine service's inbox (requests ahead of it being parsed, or the engine being built);
- ``parse``: reading the inputs, decoding the images, rendering a chat;
- ``prepare``: the processor (pixels, image tokens), tokenizing, the prefix cache's keys;
- ``queue``: from submission until the scheduler gives it a slot;
- ``prefill``: from then until its first token is read back (vision, prefill chunks, other sequences' steps);
- ``respond``: from the token to its response leaving (detokenizing, the response thread's turn, the IPC send).
"""

from __future__ import annotations

FIRST_TOKEN_PHASES = ("wait", "parse", "prepare", "queue", "prefill", "respond")
PHASE_METRIC = "triton_vlm_first_token_phase_seconds"


def first_token_phases(received: float, started: float, parsed: float, prepared: float, admitted: float,
                       produced: float, sent: float) -> dict[str, float]:
    """The phases between these stamps, in :data:`FIRST_TOKEN_PHASES` order; a phase whose stamps are not both
    there (0.0: e.g. a request the engine never scheduled, or a whole answer, which sends nothing before its end) is
    left out."""
    stamps = (received, started, parsed, prepared, admitted, produced, sent)
    return {phase: max(end - begin, 0.0)
            for phase, begin, end in zip(FIRST_TOKEN_PHASES, stamps, stamps[1:], strict=False) if begin and end}
