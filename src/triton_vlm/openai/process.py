"""The front as a child process of the launcher: started beside tritonserver, stopped with it.

API keys travel in the child's environment, never on its command line (``ps`` shows command lines).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import IO

from triton_vlm.launcher.children import die_with_parent, signal_group
from triton_vlm.openai.config import API_KEY_ENV, API_KEY_FILE_ENV, MiB, OpenAIOptions

log = logging.getLogger("triton_vlm")


def front_command(options: OpenAIOptions) -> list[str]:
    command = [sys.executable, "-m", "triton_vlm.openai", "--host", options.host, "--port", str(options.port),
               "--triton-grpc", options.triton_grpc_url,
               "--max-body-mb", repr(options.max_body_bytes / MiB),
               "--max-image-mb", repr(options.max_image_bytes / MiB),
               "--remote-image-timeout", repr(options.remote_image_timeout_s),
               "--max-concurrent-requests", str(options.max_concurrent_requests),
               "--max-concurrent-per-key", str(options.max_concurrent_per_key),
               "--request-timeout", repr(options.request_timeout_s), "--log-level", options.log_level]
    for origin in options.cors_origins:
        command += ["--cors-origin", origin]
    if options.allow_remote_images:
        command.append("--allow-remote-images")
    if options.allow_private_image_hosts:
        command.append("--allow-private-image-hosts")
    if not options.playground:
        command.append("--no-playground")
    return command


def front_environment(options: OpenAIOptions, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.pop(API_KEY_FILE_ENV, None)
    env.pop(API_KEY_ENV, None)
    if options.api_keys:
        env[API_KEY_ENV] = ",".join(options.api_keys)
    for name in [n for n in env if n.startswith("TRITON_VLM_OPENAI_")]:
        env.pop(name)  # the command line says it all
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class OpenAIFront:
    """``python -m triton_vlm.openai`` as a child: its own process group, SIGTERM when the launcher dies."""

    def __init__(self, options: OpenAIOptions, log_file: IO[str] | None = None) -> None:
        self.options = options
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OpenAIFront:
        """Start the front in its own session; it gets SIGTERM if the launcher dies."""
        self.process = subprocess.Popen(front_command(self.options), env=front_environment(self.options),
                                        stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, preexec_fn=die_with_parent)
        return self

    @property
    def health_url(self) -> str:
        return f"http://{self.options.client_host}:{self.options.port}/health"

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Until ``/health`` answers (the front is up; Triton's readiness is ``/health/ready``)."""
        from triton_vlm.launcher.distribution import LauncherError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise LauncherError(f"the OpenAI front exited (code {code}) before it was ready; see its log "
                                    f"above")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        raise LauncherError(f"the OpenAI front was not ready after {timeout:.0f}s ({self.health_url})")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (uvicorn finishes open requests for up to 5 s), SIGKILL if it hangs. Returns the exit code; 0
        for a clean stop (uvicorn ends itself with the SIGTERM it handled, after shutting down)."""
        process, self.process = self.process, None
        if process is None:
            return None
        terminated = False
        if process.poll() is None:
            terminated = True
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("the OpenAI front did not stop in %.0fs; killing it", timeout)
        signal_group(process.pid, signal.SIGKILL)
        process.wait()
        if terminated and process.returncode == -signal.SIGTERM:
            return 0
        return process.returncode
