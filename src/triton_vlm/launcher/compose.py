"""Run the server in Docker: ``docker compose -f <file> up`` in the foreground, readiness watched beside it.

The compose files read the ports, bind address and model selection from the environment (``TRITON_HTTP_PORT``,
``TRITON_HOST``, ``TRITON_VLM_MODELS``, ...), so the start script's flags reach the container through
:func:`compose_environment`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from triton_vlm.launcher.children import die_with_parent
from triton_vlm.launcher.distribution import LauncherError
from triton_vlm.launcher.server import ServerOptions, answers

COMPOSE_FILES = {"gpu": "docker-compose.yml", "cpu": "docker-compose-cpu.yml"}
STILL_WAITING_EVERY_S = 60.0


def project_dir() -> Path:
    """The directory holding the compose files: the current directory or a parent, else this source tree's."""
    explicit = os.environ.get("TRITON_VLM_PROJECT_DIR")
    if explicit:
        return Path(explicit)
    for directory in [Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]:
        if (directory / COMPOSE_FILES["gpu"]).is_file():
            return directory
    raise LauncherError("docker-compose.yml not found: run from the project directory or set "
                        "TRITON_VLM_PROJECT_DIR")


def compose_file(mode: str, directory: Path | None = None) -> Path:
    path = (directory or project_dir()) / COMPOSE_FILES[mode]
    if not path.is_file():
        raise LauncherError(f"{path} is missing")
    return path


def compose_command(compose: Sequence[str], file: Path) -> list[str]:
    return [*compose, "-f", str(file), "up"]


def compose_environment(options: ServerOptions, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for ``docker compose``: the caller's, plus what the compose files interpolate."""
    env = dict(os.environ if base is None else base)
    env.update({
        "TRITON_HTTP_PORT": str(options.http_port),
        "TRITON_GRPC_PORT": str(options.grpc_port),
        "TRITON_METRICS_PORT": str(options.metrics_port),
        "TRITON_HOST": options.host,
        "TRITON_VLM_MODELS": ",".join(options.models),
    })
    checkpoint = options.checkpoint
    env.update({  # triton-vlm serve's --model-id, --name, --family and --revision in the container
        "TRITON_VLM_MODEL_ID": checkpoint.source if checkpoint else "",
        "TRITON_VLM_MODEL_NAME": (checkpoint.name or "") if checkpoint else "",
        "TRITON_VLM_MODEL_FAMILY": (checkpoint.family or "") if checkpoint else "",
        "TRITON_VLM_MODEL_REVISION": checkpoint.revision if checkpoint else "main",
    })
    if options.tiny:
        env["TRITON_VLM_TINY"] = "1"
    if options.preload:
        env["TRITON_VLM_PRELOAD"] = "1"
    if options.openai is not None:
        # The `openai` service has the `openai` profile: it runs only when asked for.
        profiles = [p for p in env.get("COMPOSE_PROFILES", "").split(",") if p and p != "openai"]
        env["COMPOSE_PROFILES"] = ",".join([*profiles, "openai"])
        env["TRITON_OPENAI_PORT"] = str(options.openai.port)
        env["TRITON_VLM_API_KEY"] = ",".join(options.openai.api_keys)
        env["TRITON_VLM_OPENAI_CORS_ORIGINS"] = ",".join(options.openai.cors_origins)
        env["TRITON_VLM_OPENAI_ALLOW_REMOTE_IMAGES"] = "1" if options.openai.allow_remote_images else "0"
    return env


def endpoints_text(options: ServerOptions, label: str) -> str:
    host = "127.0.0.1" if options.host in ("0.0.0.0", "") else options.host
    return (f"[triton-vlm] ready ({label})\n"
            f"[triton-vlm]   HTTP     http://{host}:{options.http_port}\n"
            f"[triton-vlm]   gRPC     {host}:{options.grpc_port}\n"
            f"[triton-vlm]   metrics  http://{host}:{options.metrics_port}/metrics\n"
            + (f"[triton-vlm]   OpenAI   http://{host}:{options.openai.port}/v1\n" if options.openai else "")
            + "[triton-vlm] Ctrl-C to stop")


def run_compose(mode: str, compose: Sequence[str], options: ServerOptions, directory: Path | None = None) -> int:
    """``docker compose -f <file> up`` in the foreground; prints the endpoints once ``/v2/health/ready``
    answers. SIGINT/SIGTERM are passed on to compose, which stops the container. Returns the exit code."""
    file = compose_file(mode, directory)
    command = compose_command(compose, file)
    env = compose_environment(options)
    host = "127.0.0.1" if options.host in ("0.0.0.0", "") else options.host
    url = f"http://{host}:{options.http_port}/v2/health/ready"
    logs = " ".join([*compose, "-f", file.name, "logs", "-f"])
    print(f"[triton-vlm] running: {' '.join(command)}\n"
          f"[triton-vlm] (the first run builds the image; logs also with `{logs}`)", flush=True)
    try:
        # Its own session: a terminal's Ctrl-C reaches only us, and we pass it on once (compose treats a
        # second one as "kill now"). It still gets SIGTERM if this process dies.
        process = subprocess.Popen(command, env=env, cwd=file.parent, start_new_session=True,
                                   preexec_fn=die_with_parent)
    except OSError as exc:
        raise LauncherError(f"could not run {command[0]}: {exc}") from exc

    stopping = threading.Event()

    def _forward(signum: int, _frame: FrameType | None) -> None:
        if not stopping.is_set():
            print("[triton-vlm] stopping (docker compose stops the container)", flush=True)
        stopping.set()
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, _forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    watcher = threading.Thread(target=_watch_readiness, args=(url, options, mode, process, stopping), daemon=True)
    watcher.start()
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stopping.set()
    watcher.join(timeout=5)
    if stopping.is_set() and code in (0, 130, 143, -signal.SIGINT, -signal.SIGTERM):
        return 0
    if code != 0:
        print(f"[triton-vlm] error: `{' '.join(command)}` exited with code {code}; its output above says why "
              f"(common causes: the image build failed, Docker can't reach the GPU, a port is taken). "
              f"`--mode embedded` runs without Docker.", file=sys.stderr, flush=True)
    return code


def _watch_readiness(url: str, options: ServerOptions, mode: str, process: subprocess.Popen[bytes],
                     stopping: threading.Event) -> None:
    started = last_note = time.monotonic()
    while process.poll() is None and not stopping.is_set():
        if answers(url):
            print(endpoints_text(options, f"docker, {mode} mode"), flush=True)
            return
        now = time.monotonic()
        if now - last_note >= STILL_WAITING_EVERY_S:
            last_note = now
            print(f"[triton-vlm] still waiting for {url} after {now - started:.0f} s (building the image or "
                  f"loading models)", flush=True)
        stopping.wait(0.5)
