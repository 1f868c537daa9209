"""``triton-vlm status``: is the server up, which models does it serve, are their weights loaded?"""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("TRITON_VLM_URL", "localhost:8000"),
                        help="server address, HTTP or gRPC with --grpc (default: $TRITON_VLM_URL or localhost:8000)")
    parser.add_argument("--grpc", action="store_true", help="talk gRPC instead of HTTP")
    parser.add_argument("--metrics-url", default=os.environ.get("TRITON_VLM_METRICS_URL"),
                        help="Prometheus endpoint (default: $TRITON_VLM_METRICS_URL, else port 8002 of the --url "
                             "host where --url is on Triton's default port 8000 or 8001; other ports need it)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when the server is ready and every model READY, 3 when some are not, 1 when unreachable."""
    from triton_vlm.cli.addresses import metrics_address
    from triton_vlm.client import TritonVLMClient
    from triton_vlm.observability.status import format_status, gather

    with TritonVLMClient(args.url, protocol="grpc" if args.grpc else "http", timeout=args.timeout) as client:
        metrics = metrics_address(client.url, args.metrics_url)
        status = gather(client, metrics.url, metrics.source)
    print(json.dumps(status.to_json(), indent=2) if args.json else format_status(status), flush=True)
    healthy = status.ready and all(m.state == "READY" and m.ready for m in status.models)
    return 0 if healthy else 3
