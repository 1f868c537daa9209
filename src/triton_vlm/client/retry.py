"""Retries with exponential backoff for transient client errors: the server is still starting (connection
refused) or a model is UNAVAILABLE. Invalid requests (INVALID_ARG), unknown models and timeouts are never
retried: the first would fail the same way again, and a timed-out request may still be running."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from triton_vlm.errors import ModelUnavailableError, ServerUnreachableError

log = logging.getLogger("triton_vlm.client")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry. ``attempts`` counts the first try; waits grow from ``backoff`` by
    ``multiplier`` up to ``max_backoff`` (each with +-``jitter`` of itself), and no retry starts after
    ``deadline`` seconds from the first try.

    >>> TritonVLMClient("localhost:8000", retry=RetryPolicy(attempts=10, deadline=60))  # doctest: +SKIP
    """

    attempts: int = 5
    backoff: float = 0.5
    multiplier: float = 2.0
    max_backoff: float = 8.0
    deadline: float | None = 120.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (ServerUnreachableError, ModelUnavailableError)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.backoff < 0 or self.multiplier < 1 or self.max_backoff < 0 or not 0 <= self.jitter < 1:
            raise ValueError("backoff and max_backoff must be >= 0, multiplier >= 1 and jitter in [0, 1)")

    @classmethod
    def coerce(cls, value: RetryPolicy | int | bool | None) -> RetryPolicy:
        """``None``/``False``/``0``: one attempt; ``True``: the defaults; an int: that many retries."""
        if isinstance(value, RetryPolicy):
            return value
        if value is None or value is False:
            return cls(attempts=1)
        if value is True:
            return cls()
        if value < 0:
            raise ValueError(f"retries must be >= 0, got {value}")
        return cls(attempts=int(value) + 1)

    def delays(self) -> Iterator[float]:
        """The waits before the 2nd, 3rd, ... attempt."""
        delay = self.backoff
        for _ in range(self.attempts - 1):
            yield max(0.0, delay * (1 + random.uniform(-self.jitter, self.jitter)))
            delay = min(delay * self.multiplier, self.max_backoff)

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, self.retry_on)

    def call(self, fn: Callable[[], T], *, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> T:
        """``fn()``, retried on :attr:`retry_on` errors; the last error is raised when retries run out."""
        started = clock()
        delays = self.delays()
        while True:
            try:
                return fn()
            except self.retry_on as exc:
                delay = self._next(delays, started, clock, exc)
                sleep(delay)

    async def acall(self, fn: Callable[[], Awaitable[T]], *,
                    clock: Callable[[], float] = time.monotonic) -> T:
        """The asyncio version of :meth:`call`."""
        started = clock()
        delays = self.delays()
        while True:
            try:
                return await fn()
            except self.retry_on as exc:
                delay = self._next(delays, started, clock, exc)
                await asyncio.sleep(delay)

    def _next(self, delays: Iterator[float], started: float, clock: Callable[[], float],
              exc: BaseException) -> float:
        delay = next(delays, None)
        if delay is None or (self.deadline is not None and clock() - started + delay > self.deadline):
            raise exc
        log.info("%s; retrying in %.1fs", exc, delay)
        return delay
