"""How ``triton-vlm infer`` talks to people and to scripts.

- Not a terminal (pipes, scripts, tests): exactly the generated text and a newline, nothing else.
- ``--json``: one JSON object: text, generated_tokens, prompt_tokens, finish_reason, latency_s.
- A terminal: a spinner on stderr while the answer is on its way (saying so when the first request is loading the
  model's weights), the text, then a dim summary line on stderr.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Spinner:
    """A one-line spinner on ``stream``, shown after ``delay`` seconds and erased on exit.

    ``describe()`` (called once, on the spinner's thread, when it first shows) gives the message, e.g. whether
    the model is still loading; it may be slow (it can read the server's metrics) without delaying the request.
    """

    def __init__(self, stream: IO[str], describe: Callable[[], str], *, delay: float = 0.3,
                 interval: float = 0.1) -> None:
        self.stream, self.describe, self.delay, self.interval = stream, describe, delay, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="triton-vlm-spinner", daemon=True)
        self.shown = False

    def __enter__(self) -> Spinner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def _run(self) -> None:
        if self._stop.wait(self.delay):
            return
        try:
            message = self.describe()
        except Exception:
            message = "waiting for the answer"
        started = time.monotonic() - self.delay
        for frame in itertools.cycle(FRAMES):
            if self._stop.is_set():
                return
            self.shown = True
            self.stream.write(f"\r\x1b[2K{frame} {message} ({time.monotonic() - started:.0f}s)")
            self.stream.flush()
            if self._stop.wait(self.interval):
                return


def loading_message(model: str, metrics_url: str | None) -> str:
    """What the spinner says: whether ``model``'s weights still have to load (from the server's metrics)."""
    if metrics_url:
        from triton_vlm.observability.scrape import fetch_metrics, parse_metrics, value_of

        try:
            loaded = value_of(parse_metrics(fetch_metrics(metrics_url, timeout=2)), "triton_vlm_model_loaded",
                              model=model)
        except Exception:
            loaded = None
        if loaded == 0:
            return f"loading {model}'s weights on this first request (this can take a while)"
    return f"waiting for {model}"


def result_json(text: str, generated_tokens: int, prompt_tokens: int, finish_reason: str, latency_s: float) -> str:
    return json.dumps({"text": text, "generated_tokens": generated_tokens, "prompt_tokens": prompt_tokens,
                       "finish_reason": finish_reason, "latency_s": round(latency_s, 6)}, ensure_ascii=False)


def print_result(result: Any, *, model: str, as_json: bool, stdout: IO[str] | None = None,
                 stderr: IO[str] | None = None) -> None:
    """Print one answer (an ``InferenceResult``-like object) the way the output's reader wants it."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if as_json:
        print(result_json(result.text, result.generated_tokens, result.prompt_tokens, result.finish_reason,
                          result.latency_s), file=stdout, flush=True)
        return
    print(result.text, file=stdout, flush=True)
    if is_terminal(stdout) and is_terminal(stderr):
        print(f"\x1b[2m{model} · {result.generated_tokens} tokens ({result.prompt_tokens} prompt) · "
              f"{result.finish_reason or '-'} · {result.latency_s:.2f} s\x1b[0m", file=stderr, flush=True)
