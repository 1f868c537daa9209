"""What a Triton queue policy costs a batched model: with and without, side by side in one run (tiny llava, CPU).

Two servers start from the same repository: one as shipped (no queue policy, so Triton prefetches payloads) and
one with ``--max-queue-size 64 --queue-timeout-ms 300000`` (the bound the batched models used to ship with).
Plain ``infer`` runs at each concurrency alternate between the two, a few times, so drift hits both alike.

    .venv/bin/python bench/queue_policy.py --json bench/results/cpu-tiny-llava-queue-policy.json
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
from pathlib import Path

from triton_vlm.bench.workload import RunResult, Workload, format_table, run_served, warm_up
from triton_vlm.launcher import ServerOptions, TritonServer

BOUNDED = {"max_queue_size": 64, "queue_timeout_ms": 300_000}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start(model: str, **queue: int) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    log = Path(tempfile.mkstemp(prefix="triton-vlm-queue-policy-", suffix=".log")[1])
    server = TritonServer(ServerOptions(models=(model,), tiny=True, preload=True, http_port=http, grpc_port=grpc,
                                        metrics_port=metrics, **queue), log_file=open(log, "w"))
    server.start()
    server.wait_until_ready(timeout=600)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    workload = Workload(model=args.model, requests=args.requests)
    servers = {"no policy (shipped)": start(args.model), "queue policy": start(args.model, **BOUNDED)}
    try:
        for server in servers.values():
            warm_up(server.grpc_url, workload, ["infer"])
        runs: dict[str, list[RunResult]] = {name: [] for name in servers}
        for concurrency in levels:
            for _ in range(args.repeats):
                for name, server in servers.items():
                    runs[name].append(run_served(server.grpc_url, workload, concurrency, api="infer"))
    finally:
        for server in servers.values():
            server.stop()
    for name, rows in runs.items():
        print(format_table(f"{args.model} plain infer, {name}", rows), flush=True)
    ratios = {}
    for concurrency in levels:
        tok_s = {name: sum(r.output_tok_s for r in rows if r.concurrency == concurrency) for name, rows in runs.items()}
        ratios[f"c{concurrency}"] = tok_s["no policy (shipped)"] / tok_s["queue policy"]
    print("throughput, no policy / queue policy: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        args.json.write_text(json.dumps({
            "command": "bench/queue_policy.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                           if v is not None and k != "json"),
            "bounded_options": BOUNDED, "runs": {name: [r.as_json() for r in rows] for name, rows in runs.items()},
            "throughput_ratio_no_policy_over_policy": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
