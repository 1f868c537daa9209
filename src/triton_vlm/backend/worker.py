"""The shape the stream model's three parts share: a daemon thread that owns one inbox, stopped by a ``None`` in it.

The engine service, the response loop and the batched tasks each subclass :class:`InboxWorker` and write ``_run``;
anyone may put into the inbox (``queue.SimpleQueue`` is thread-safe), only the worker's thread takes from it.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

M = TypeVar("M")
W = TypeVar("W", bound="InboxWorker[Any]")


class InboxWorker(ABC, Generic[M]):
    """A named daemon thread running :meth:`_run` over ``self._inbox``; ``None`` in the inbox asks it to stop."""

    def __init__(self, name: str) -> None:
        self._inbox: queue.SimpleQueue[M | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def name(self) -> str:
        return self._thread.name

    def start(self: W) -> W:
        self._thread.start()
        return self

    def _join(self, timeout: float) -> bool:
        """Ask the thread to stop once it reaches the request; whether it stopped within ``timeout`` seconds."""
        self._inbox.put(None)
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    @abstractmethod
    def _run(self) -> None:
        """The thread's loop; it returns when it takes ``None`` from the inbox."""
