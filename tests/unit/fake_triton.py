"""A tiny stand-in for Triton's HTTP/REST API (KServe v2), for client tests that need exact control over what the
server answers and when it comes up: a few JSON routes, a request log, and scripted failures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OUTPUTS = ("generated_text", "generated_tokens", "prompt_tokens", "finish_reason")


def answer(model: str, text: str = "a house", generated: int = 3, prompt: int = 7,
           finish: str = "stop") -> dict[str, Any]:
    return {"model_name": model, "model_version": "1", "outputs": [
        {"name": "generated_text", "datatype": "BYTES", "shape": [1, 1], "data": [text]},
        {"name": "generated_tokens", "datatype": "INT32", "shape": [1, 1], "data": [generated]},
        {"name": "prompt_tokens", "datatype": "INT32", "shape": [1, 1], "data": [prompt]},
        {"name": "finish_reason", "datatype": "BYTES", "shape": [1, 1], "data": [finish]},
    ]}


#: A ``script`` status that closes the connection without an answer.
HANG_UP = 0


class FakeTriton:
    """``script(path, attempt)`` returns ``(status, body)`` for POST /infer requests; GETs are routed to
    ``routes``. Every request is logged in :attr:`requests` as ``(method, path)``."""

    def __init__(self, port: int, script: Callable[[str, int], tuple[int, dict[str, Any]]] | None = None,
                 routes: dict[str, Any] | None = None, delay: float = 0.0) -> None:
        self.port, self.delay = port, delay
        self.script = script or (lambda path, attempt: (200, answer(path.split("/")[3])))
        self.routes = routes or {}
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def start(self, after: float = 0.0) -> FakeTriton:
        """Listen now, or ``after`` seconds from now (on a thread): a server that is still starting."""
        def serve() -> None:
            time.sleep(after)
            self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
            self._server.daemon_threads = True
            self._server.serve_forever(poll_interval=0.05)

        threading.Thread(target=serve, daemon=True).start()
        if not after:
            deadline = time.monotonic() + 5
            while self._server is None and time.monotonic() < deadline:
                time.sleep(0.01)
        return self

    def stop(self) -> None:
        deadline = time.monotonic() + 10
        while self._server is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def infer_count(self) -> int:
        return sum(1 for method, path in self.requests if method == "POST" and path.endswith("/infer"))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                with fake._lock:
                    fake.requests.append(("GET", self.path))
                route = fake.routes.get(self.path)
                if route is None:
                    self._send(404, {"error": f"no route {self.path}"})
                elif isinstance(route, tuple):
                    self._send(*route)
                else:
                    self._send(200, route)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                self.rfile.read(length)
                with fake._lock:
                    fake.requests.append(("POST", self.path))
                    attempt = fake.infer_count()
                if fake.delay:
                    time.sleep(fake.delay)
                if self.path.endswith("/infer"):
                    status, body = fake.script(self.path, attempt)
                    if status == HANG_UP:  # a server that dies mid-request
                        self.close_connection = True
                        return
                    self._send(status, body)
                else:
                    route = fake.routes.get(self.path, (404, {"error": "no route"}))
                    self._send(*route) if isinstance(route, tuple) else self._send(200, route)

        return Handler
