"""``triton-vlm dashboard-preview``: render the Grafana dashboard's panels from real scraped metrics."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the observability modules load with the command, not with the CLI
    from triton_vlm.observability.scrape import Recording


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tiny", action="store_true",
                       help="start a tiny-model server on free loopback ports for the recording, then stop it")
    where.add_argument("--recording", type=Path, default=None,
                       help="render a recording saved with --save-recording (no server needed)")
    parser.add_argument("--metrics-url", default=os.environ.get("TRITON_VLM_METRICS_URL",
                                                                "http://localhost:8002/metrics"),
                        help="the server's Prometheus endpoint (default: $TRITON_VLM_METRICS_URL or "
                             "http://localhost:8002/metrics)")
    parser.add_argument("--url", default=None, help="HTTP address of the server to send a small load to while "
                                                    "recording (default: record only)")
    parser.add_argument("--grpc-url", default=None, help="gRPC address for the token streams of the load "
                                                         "(default: the --url host, port 8001, where --url is on "
                                                         "port 8000; other ports need it)")
    parser.add_argument("--models", default="llava,kosmos2,moondream2", help="models the load asks")
    parser.add_argument("--rounds", type=int, default=2, help="load rounds (each: every model at concurrency "
                                                              "1, 2 and 4, and a token stream)")
    parser.add_argument("--seconds", type=float, default=180.0, help="longest recording (default 180)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes (default 1)")
    parser.add_argument("--rate-interval", default="10s", help="the window $__rate_interval stands for (10s)")
    parser.add_argument("--dashboard", type=Path, default=None, help="dashboard JSON (default: the project's)")
    parser.add_argument("--output", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--save-recording", type=Path, default=None, help="also write the raw scrapes (JSON)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")


def run(args: argparse.Namespace) -> int:
    from triton_vlm.cli.addresses import grpc_address
    from triton_vlm.errors import TritonVLMError
    from triton_vlm.observability import dashboard as dash
    from triton_vlm.observability.scrape import Recording

    def say(message: str) -> None:
        if not args.json:
            print(f"[triton-vlm] {message}", file=sys.stderr, flush=True)

    board = dash.load_dashboard(args.dashboard)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.recording is not None:
        recording = Recording.from_json(json.loads(args.recording.read_text()))
        source = recording.source or f"recording {args.recording}"
    elif args.tiny:
        recording = _record_tiny(args, models, say)
        source = "a tiny-model server (random weights, CPU)"
    else:
        grpc_url = None
        if args.url:
            grpc = grpc_address(args.url, args.grpc_url)
            if grpc.url is None:
                raise TritonVLMError(f"dashboard-preview: {grpc.source}")
            grpc_url = grpc.url
        load = f", load to {args.url} (HTTP) and {grpc_url} (gRPC)" if args.url else ""
        say(f"recording {args.metrics_url} every {args.interval:g}s{load}")
        recording = dash.collect(args.metrics_url, seconds=args.seconds, interval=args.interval, http_url=args.url,
                                 grpc_url=grpc_url, models=models, rounds=args.rounds, log=say)
        source = args.metrics_url
    recording.source = source
    if args.save_recording is not None:
        args.save_recording.parent.mkdir(parents=True, exist_ok=True)
        args.save_recording.write_text(json.dumps(recording.to_json()))
    data = dash.evaluate(board, recording, args.rate_interval)
    seconds = recording.times[-1] - recording.times[0] if recording.times else 0.0
    dash.render(data, recording.times, args.output, title=board.get("title", "triton-vlm"),
                subtitle=f"dashboard preview: the panels' PromQL over {len(recording.times)} scrapes "
                         f"({seconds:.0f} s) of {source}; $__rate_interval = {args.rate_interval}")
    result = dash.summary(data, recording, args.output)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        empty = [p["title"] for p in result["panels"] if not p["has_data"]]
        say(f"wrote {args.output} ({len(result['panels'])} panels"
            f"{'; no data: ' + ', '.join(empty) if empty else ''})")
    return 0


def _record_tiny(args: argparse.Namespace, models: list[str], say: Callable[[str], None]) -> Recording:
    import socket
    import tempfile

    from triton_vlm.launcher import ServerOptions, TritonServer
    from triton_vlm.observability import dashboard as dash

    ports: list[int] = []
    sockets = []
    for _ in range(3):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    http, grpc, metrics = sorted(ports)
    log_path = Path(tempfile.mkstemp(prefix="triton-vlm-dashboard-", suffix=".log")[1])
    say(f"starting a tiny server for {', '.join(models)}; its log: {log_path}")
    with open(log_path, "w") as log_file:
        server = TritonServer(ServerOptions(models=tuple(models), tiny=True, http_port=http, grpc_port=grpc,
                                            metrics_port=metrics), log_file=log_file)
        with server:
            server.wait_until_ready(timeout=300)
            say(f"recording {server.metrics_url} while sending a load")
            return dash.collect(server.metrics_url, seconds=args.seconds, interval=args.interval,
                                http_url=server.http_url, grpc_url=server.grpc_url, models=models,
                                rounds=args.rounds, log=say)
