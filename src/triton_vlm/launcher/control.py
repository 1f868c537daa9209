"""Triton's model repository API (index, load, unload) and liveness, as the launcher calls them.

The repository API is only reachable with the launcher's admin header (``--http-restricted-api`` /
``--grpc-restricted-protocol``), so nobody else can load or unload models.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

__all__ = ["ADMIN_HEADER", "ALIVE_POLL_S", "ModelControl"]

#: The header the repository API (model load/unload, index) requires; gRPC metadata key
#: ``triton-grpc-protocol-<this>``.
ADMIN_HEADER = "triton-vlm-admin-key"
#: How often a long repository call checks that the server it waits for still runs.
ALIVE_POLL_S = 0.5


class ModelControl:
    """Triton's model repository API over HTTP, with the launcher's admin header."""

    def __init__(self, http_url: str, admin_key: str, timeout: float = 300.0) -> None:
        self.http_url = http_url
        self.base = f"http://{http_url}/v2/repository"
        self.headers = {ADMIN_HEADER: admin_key, "Content-Type": "application/json"}
        self.timeout = timeout

    def _post(self, path: str, body: dict[str, Any] | None = None, alive: Callable[[], bool] | None = None) -> bytes:
        """POST to the repository API. With ``alive``, the call is given up as soon as it says the server is gone:
        a load can rightly take minutes, but one sent to a server that then aborted may hang to the timeout
        (its connection stays open in the stubs), and the server is not started again meanwhile."""
        request = urllib.request.Request(self.base + path, data=json.dumps(body or {}).encode(), method="POST",
                                         headers=self.headers)

        def call() -> bytes:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")
                raise RuntimeError(f"{path}: HTTP {exc.code}: {detail}") from None

        if alive is None:
            return call()
        outcome: list[bytes | BaseException] = []

        def run() -> None:
            try:
                outcome.append(call())
            except BaseException as exc:  # handed to the waiting thread
                outcome.append(exc)

        worker = threading.Thread(target=run, name="triton-vlm-control", daemon=True)  # dies with us if left
        worker.start()
        while worker.is_alive():
            worker.join(ALIVE_POLL_S)
            if worker.is_alive() and not alive():
                raise RuntimeError(f"{path}: tritonserver exited during the call")
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def index(self) -> dict[str, dict[str, str]]:
        """Every model of the repository: ``{name: {"state": READY|UNAVAILABLE|..., "reason": ...}}``."""
        return {m["name"]: {"state": m.get("state", ""), "reason": m.get("reason", "")}
                for m in json.loads(self._post("/index") or b"[]")}

    def live(self, timeout: float = 5.0) -> bool:
        """Whether the server answers ``/v2/health/live`` (open to all: no admin key)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/live", timeout=timeout) as response:
                return response.status == 200
        except (OSError, ValueError):
            return False

    def load(self, model: str, alive: Callable[[], bool] | None = None) -> None:
        """Load ``model`` (again); raises RuntimeError with Triton's reason if it fails (see :meth:`_post`)."""
        self._post(f"/models/{model}/load", alive=alive)

    def unload(self, model: str, alive: Callable[[], bool] | None = None) -> None:
        """Unload ``model``; its readiness answers 400 from now on."""
        self._post(f"/models/{model}/unload", alive=alive)
