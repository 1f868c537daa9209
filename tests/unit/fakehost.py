"""Simulated hosts for ``./triton_start.sh``: fake ``nvidia-smi`` / ``docker`` / ``docker-compose`` executables.

A host is a directory put first on a ``PATH`` that holds nothing else but a few system tools (so the real
docker CLI of the machine running the tests is never seen). The fakes read ``scenario.json`` beside them and
append every call to ``calls.jsonl``. ``docker compose ... up`` serves ``/v2/health/ready`` on
``$TRITON_HTTP_PORT`` (as the container would) until SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

SYSTEM_TOOLS = ("bash", "env", "dirname", "make", "python3", "sleep", "cat")

FAKE = r'''#!{python}
import http.server, json, os, signal, sys, threading
here = os.path.dirname(os.path.abspath(__file__))
scenario = json.load(open(os.path.join(here, "scenario.json")))
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]

def log(**entry):
    with open(os.path.join(here, "calls.jsonl"), "a") as f:
        f.write(json.dumps(dict(entry, tool=name)) + "\n")

ENV_KEYS = ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT", "TRITON_HOST", "TRITON_VLM_MODELS",
            "TRITON_VLM_TINY", "TRITON_VLM_PRELOAD")
log(argv=args, env={{k: os.environ[k] for k in ENV_KEYS if k in os.environ}}, cwd=os.getcwd())

if name == "nvidia-smi":
    if scenario.get("nvidia_smi") == "broken":
        print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
              "latest NVIDIA driver is installed and running.")
        sys.exit(9)
    print("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0c8a2a8e-0000-0000-0000-000000000000)")
    sys.exit(0)

def compose_up(rest):
    if scenario.get("compose_up") == "fail":
        print('Error response from daemon: could not select device driver "nvidia" with capabilities: [[gpu]]',
              file=sys.stderr)
        sys.exit(1)

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", int(os.environ.get("TRITON_HTTP_PORT", "8000"))), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("triton-1  | fake container started", flush=True)
    stopped = threading.Event()

    def stop(signum, frame):
        log(signal=signal.Signals(signum).name)
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopped.wait(120)
    server.shutdown()
    print("triton-1 exited with code 0", flush=True)
    sys.exit(0)

if name == "docker-compose":
    if "up" in args:
        compose_up(args)
    sys.exit(0)

# docker
if args[:1] == ["info"]:
    daemon = scenario.get("daemon", "up")
    if daemon == "down":
        print("null")
        print("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?",
              file=sys.stderr)
        sys.exit(1)
    if daemon == "denied":
        print("permission denied while trying to connect to the Docker daemon socket at "
              "unix:///var/run/docker.sock: Get \"http://%2Fvar%2Frun%2Fdocker.sock/v1.47/info\": dial unix "
              "/var/run/docker.sock: connect: permission denied", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(scenario.get("runtimes", {{"runc": {{"path": "runc"}}}})))
    sys.exit(0)
if args[:1] == ["compose"]:
    if not scenario.get("compose_plugin", True):
        print("docker: unknown command: docker compose", file=sys.stderr)
        sys.exit(1)
    if args[1:2] == ["version"]:
        print("Docker Compose version v2.29.7")
        sys.exit(0)
    if "up" in args:
        compose_up(args)
sys.exit(0)
'''

NVIDIA_RUNTIMES = {"runc": {"path": "runc"}, "nvidia": {"path": "nvidia-container-runtime"}}


@dataclass
class FakeHost:
    bin_dir: Path
    system_dir: Path

    @property
    def path(self) -> str:
        return f"{self.bin_dir}{os.pathsep}{self.system_dir}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_VLM_MODE")}
        env.update(PATH=self.path, **extra)
        return env

    def calls(self, tool: str | None = None) -> list[dict]:
        log = self.bin_dir / "calls.jsonl"
        if not log.exists():
            return []
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return [e for e in entries if tool is None or e["tool"] == tool]

    def compose_up_calls(self) -> list[dict]:
        return [c for c in self.calls() if "argv" in c and "up" in c["argv"]]


def make_host(root: Path, *, gpu: str | None = None, docker: str | None = None, nvidia_runtime: bool = False,
              compose_plugin: bool = True, standalone_compose: bool = False, compose_up: str = "serve") -> FakeHost:
    """``gpu``: None (no nvidia-smi), "ok" or "broken"; ``docker``: None (not installed), "up", "down" or
    "denied" (the daemon's state)."""
    bin_dir, system_dir = root / "fakebin", root / "sysbin"
    bin_dir.mkdir(parents=True)
    system_dir.mkdir(parents=True)
    for tool in SYSTEM_TOOLS:
        found = shutil.which(tool)
        if found:
            (system_dir / tool).symlink_to(found)
    scenario = {"nvidia_smi": gpu, "daemon": docker, "compose_plugin": compose_plugin, "compose_up": compose_up,
                "runtimes": NVIDIA_RUNTIMES if nvidia_runtime else {"runc": {"path": "runc"}}}
    (bin_dir / "scenario.json").write_text(json.dumps(scenario))
    script = FAKE.format(python=sys.executable)
    tools = (["nvidia-smi"] if gpu else []) + (["docker"] if docker else []) + \
        (["docker-compose"] if standalone_compose else [])
    for tool in tools:
        path = bin_dir / tool
        path.write_text(script)
        path.chmod(0o755)
    return FakeHost(bin_dir, system_dir)
