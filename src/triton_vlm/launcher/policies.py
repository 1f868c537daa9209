"""Overload limits of the served models: Triton's queue policy, opt-in at launch, and the batching delay.

A batched model's ``dynamic_batching { default_queue_policy { ... } }`` can bound its queue (``max_queue_size``:
more requests are refused at once with UNAVAILABLE) and how long a request may wait in it
(``default_timeout_microseconds``; a request may then ask for less with its ``timeout`` parameter). The shipped
batched models have none: in Triton 2.51 any queue policy turns payload prefetching off, and a single-instance
model then misses the wake-up after a batch and leaves the next request queued up to 500 ms (core's dynamic
batcher: its notify comes before the instance is free again). The launcher adds one for every model
(``--max-queue-size``, ``--queue-timeout-ms``) or for one (``TRITON_VLM_<MODEL>_MAX_QUEUE_SIZE``,
``..._QUEUE_TIMEOUT_MS``; these win). The engine models keep theirs: their ``execute`` returns at once, and their
engine reads ``max_queue_size`` as its own bound.

The batching delay (``max_queue_delay_microseconds``) is the other side of the same trade: how long the first
request of a batch may wait for company. ``--batch-delay-us`` / ``TRITON_VLM_<MODEL>_BATCH_DELAY_US``.

The per-model values are the schema's :class:`~triton_vlm.config.BatchingConfig`, read by its one reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from triton_vlm._protocol.model_config import dump_model_config, load_model_config
from triton_vlm.config import read_batching
from triton_vlm.launcher.distribution import LauncherError


def _number(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise LauncherError(f"{name} must be a whole number, got {value!r}") from None
    if number < 0:
        raise LauncherError(f"{name} must be >= 0, got {number}")
    return number


def queue_limits(model: str, max_queue_size: int | None, queue_timeout_ms: int | None,
                 env: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """``(max_queue_size, timeout_ms)`` for ``model``: its env overrides, else the launcher's; None: as
    configured. 0 means unbounded for both, as in Triton."""
    own = read_batching(model, env)
    return (_number(max_queue_size, "max_queue_size") if own.max_queue_size is None else own.max_queue_size,
            _number(queue_timeout_ms, "queue_timeout_ms") if own.queue_timeout_ms is None else own.queue_timeout_ms)


def apply_queue_policy(model_dir: Path, max_queue_size: int | None, queue_timeout_ms: int | None) -> bool:
    """Bound ``model_dir``'s queue: a batched model gets Triton's default queue policy, an engine (decoupled)
    model its ``max_queue_size`` parameter (its engine's own bound; a queue timeout does not apply to it).
    False (nothing written) for a model without dynamic batching or with nothing to change."""
    if max_queue_size is None and queue_timeout_ms is None:
        return False
    path = model_dir / "config.pbtxt"
    config = load_model_config(path)
    if not config.HasField("dynamic_batching"):
        return False
    if config.model_transaction_policy.decoupled:
        if max_queue_size is None:
            return False
        config.parameters["max_queue_size"].string_value = str(max_queue_size)
    else:
        policy = config.dynamic_batching.default_queue_policy
        if max_queue_size is not None:
            policy.max_queue_size = max_queue_size
        if queue_timeout_ms is not None:
            policy.default_timeout_microseconds = queue_timeout_ms * 1000
            policy.timeout_action = policy.REJECT
            # Triton honours a request's own (shorter) timeout only below a non-zero default.
            policy.allow_timeout_override = queue_timeout_ms > 0
    path.write_text(dump_model_config(config))
    return True


def own_batch_delay(model: str, env: Mapping[str, str] | None = None) -> int | None:
    """``model``'s own batching delay, ``TRITON_VLM_<MODEL>_BATCH_DELAY_US``; None where it has none."""
    return read_batching(model, env).batch_delay_us


def apply_batch_delay(model_dir: Path, delay_us: int | None, own_us: int | None = None) -> bool:
    """Rewrite ``model_dir/config.pbtxt``'s batching delay: the model's own (``own_us``) where set, else the
    launcher-wide ``delay_us``. False (nothing written) for a model without dynamic batching or with nothing to
    change. A launcher-wide delay leaves decoupled engine models alone: their scheduler batches between decode
    steps, so a wait in front of it would only add latency."""
    delay = _number(delay_us, "batch_delay_us") if own_us is None else own_us
    if delay is None:
        return False
    path = model_dir / "config.pbtxt"
    config = load_model_config(path)
    if not config.HasField("dynamic_batching") or (config.model_transaction_policy.decoupled and own_us is None):
        return False
    config.dynamic_batching.max_queue_delay_microseconds = delay
    path.write_text(dump_model_config(config))
    return True


def instance_count(model_dir: Path) -> int:
    """How many instances (Python stubs) a rendered model runs."""
    config = load_model_config(model_dir / "config.pbtxt")
    return sum(max(group.count, 1) for group in config.instance_group) or 1
