"""``triton-vlm bench``: throughput and latency through the real server, beside the HF-generate baseline."""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from triton_vlm.bench.chat import (
    ANSWERS,
    CANNED_ANSWER,
    IMAGE_SEED,
    QUESTIONS,
    engine_counters,
    format_chat_table,
    run_chat,
    warm_up_chat,
)
from triton_vlm.bench.workload import (
    RoundTrip,
    RunResult,
    Workload,
    format_table,
    plot,
    run_hf_baseline,
    run_round_trip,
    run_served,
    warm_up,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="gRPC address of a running server (host:8001)")
    where.add_argument("--serve", action="store_true", help="start a server with the configured weights")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints (starts a tiny server without --url)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", default="64",
                        help="requests per concurrency level (one number, or one per level)")
    parser.add_argument("--api", choices=("stream", "infer", "both"), default="stream",
                        help="stream from <model>_stream, plain infer on the public model, or both")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run plain HF generate in this process (default: on)")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument("--engine", choices=("auto", "on", "off"), default="auto", help="for a started server")
    parser.add_argument("--batch-delay-us", type=int, default=None,
                        help="for a started server: Triton's batching delay (default: config.pbtxt's)")
    parser.add_argument("--round-trip", type=int, default=0, metavar="N",
                        help="also time N one-token requests in-process and through the server, alternating, and "
                             "report what Triton adds (p50); keeps the in-process model loaded beside the server")
    parser.add_argument("--chat-turns", type=int, default=0, metavar="N",
                        help="instead: the chat benchmark, TTFT of each of N turns (up to 4) of conversations about "
                             "one image each, streamed one at a time; --max-tokens a turn, no baseline")
    parser.add_argument("--conversations", type=int, default=8, help="with --chat-turns: conversations timed")
    parser.add_argument("--metrics-url", default=None,
                        help="with --chat-turns and --url: the server's metrics (host:8002), to record what its "
                             "engine prefilled and its prefix cache held during the run")
    parser.add_argument("--chat-answers", choices=ANSWERS, default="model",
                        help="with --chat-turns: the earlier answers later turns send back: the model's, or a fixed "
                             "one of about 60 tokens (random weights answer with pieces that come back much longer)")


def run(args: argparse.Namespace) -> int:
    if args.chat_turns:
        return run_chat_mode(args)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    counts = [int(n) for n in str(args.requests).split(",") if n.strip()]
    counts = counts * len(levels) if len(counts) == 1 else counts
    if len(counts) != len(levels):
        raise SystemExit("--requests: give one number or one per concurrency level")
    workloads = [Workload(model=args.model, image_size=args.image_size, max_tokens=args.max_tokens, requests=n)
                 for n in counts]
    workload = workloads[0]
    baseline: list[RunResult] = []
    if args.baseline:
        # First, and freed before the server starts: both would not fit one GPU together.
        from triton_vlm.direct import direct_runtime

        runtime = direct_runtime(args.model, tiny=args.tiny)
        baseline = [run_hf_baseline(runtime, w, c) for w, c in zip(workloads, levels, strict=True)]
        if not args.round_trip:
            del runtime
            _free_memory()
        print(format_table(f"HF generate baseline ({args.model}, in-process)", baseline), flush=True)
    server = None
    url = args.url
    if url is None:
        server = start_server(args.model, tiny=args.tiny, engine=args.engine, batch_delay_us=args.batch_delay_us)
        url = server.grpc_url
    apis = ["stream", "infer"] if args.api == "both" else [args.api]
    round_trip: RoundTrip | None = None
    try:
        if args.round_trip:
            if not args.baseline:
                from triton_vlm.direct import direct_runtime

                runtime = direct_runtime(args.model, tiny=args.tiny)
            round_trip = run_round_trip(runtime, url, workload, args.round_trip)
            del runtime
            _free_memory()
            print(f"Triton round trip ({round_trip.requests} one-token requests, alternating): in-process p50 "
                  f"{round_trip.direct_p50_s * 1e3:.1f} ms, served p50 {round_trip.served_p50_s * 1e3:.1f} ms, "
                  f"added {round_trip.overhead_p50_s * 1e3:.1f} ms", flush=True)
        warm_up(url, workload, apis)
        served = [run_served(url, w, c, api=api) for api in apis for w, c in zip(workloads, levels, strict=True)]
    finally:
        if server is not None:
            server.stop()
            server.log_file.close()
    print(format_table(f"triton-vlm served ({args.model} through Triton: {', '.join(apis)})", served), flush=True)
    pairs = list(zip(served, baseline * len(apis), strict=True)) if baseline else []
    ratios = {f"{s.extra['api']}_c{s.concurrency}": s.output_tok_s / b.output_tok_s for s, b in pairs}
    repeated = {f"{s.extra['api']}_c{s.concurrency}": s.output_tok_s / b.extra["repeated_tok_s"] for s, b in pairs}
    if ratios:
        print("served / baseline throughput: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items())
              + "; / the baseline's repeat: " + ", ".join(f"{k} {v:.1f}x" for k, v in repeated.items()))
    report: dict[str, Any] = {
        "command": _command(),
        "workload": {"model": args.model, "image_size": args.image_size, "max_tokens": args.max_tokens,
                     "requests": counts, "prompt": workload.prompt, "ignore_eos": True},
        "runs": [r.as_json() for r in served],
        "baseline": [r.as_json() for r in baseline],
        "ratios": ratios,
        "ratios_vs_repeated_baseline": repeated,
    }
    if round_trip is not None:
        report["round_trip"] = round_trip.as_json()
    if len(levels) > 1:
        # Dynamic batching at work: throughput at the highest concurrency over the lowest, same server, same run.
        report["scaling"] = {f"{api}_c{levels[-1]}_over_c{levels[0]}": rows[-1].output_tok_s / rows[0].output_tok_s
                             for api in apis
                             for rows in [[r for r in served if r.extra["api"] == api]] if rows[0].output_tok_s}
        print("throughput scaling: " + ", ".join(f"{k} {v:.1f}x" for k, v in report["scaling"].items()))
    report.update(_environment())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot and not plot(str(args.plot), served, baseline):
        print("matplotlib is not installed: no plot", file=sys.stderr)
    failed = sum(r.errors for r in served)
    return 1 if failed else 0


def run_chat_mode(args: argparse.Namespace) -> int:
    """``--chat-turns``: the chat benchmark (:mod:`triton_vlm.bench.chat`) against ``--url`` or a started server."""
    if not 1 <= args.chat_turns <= len(QUESTIONS):
        raise SystemExit(f"--chat-turns: 1 to {len(QUESTIONS)}")
    workload = Workload(model=args.model, image_size=args.image_size, max_tokens=args.max_tokens,
                        requests=args.conversations, image_seed=IMAGE_SEED)
    server = None
    url, metrics_url = args.url, args.metrics_url
    if url is None:
        server = start_server(args.model, tiny=args.tiny, engine=args.engine, batch_delay_us=args.batch_delay_us)
        url, metrics_url = server.grpc_url, server.metrics_url
    counters: dict[str, float] = {}
    try:
        warm_up_chat(url, workload, args.chat_turns, args.chat_answers)
        if metrics_url:
            time.sleep(0.5)  # the engine's counters are published every 0.25 s
            before = engine_counters(metrics_url, args.model)
        result = run_chat(url, workload, args.chat_turns, args.chat_answers, metrics_url=metrics_url)
        if metrics_url:
            time.sleep(0.5)
            after = engine_counters(metrics_url, args.model)
            counters = {key: after[key] - before.get(key, 0.0) for key in after}
    finally:
        if server is not None:
            server.stop()
            server.log_file.close()
    print(format_chat_table(f"triton-vlm chat ({args.model}: {args.conversations} conversations of "
                            f"{args.chat_turns} turns, {args.max_tokens} tokens a turn, one at a time)", result),
          flush=True)
    if counters:
        print("engine during the timed conversations: " + ", ".join(f"{k} {v:.0f}" for k, v in counters.items()))
    report: dict[str, Any] = {
        "command": _command(),
        "workload": {"model": args.model, "image_size": args.image_size, "max_tokens": args.max_tokens,
                     "conversations": args.conversations, "turns": args.chat_turns,
                     "questions": list(QUESTIONS[:args.chat_turns]), "answers": args.chat_answers,
                     **({"canned_answer": CANNED_ANSWER} if args.chat_answers == "canned" else {}),
                     "ignore_eos": True, "concurrency": 1},
        **result.as_json(),
        # What the server's engine did during the timed conversations (with --metrics-url or a started server).
        "engine_counters": counters,
    }
    report.update(_environment())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if result.errors else 0


def start_server(model: str, *, tiny: bool = False, engine: str = "auto", batch_delay_us: int | None = None) -> Any:
    """A ready server for ``model`` on the first free ports from 18000, logging to a temporary file
    (``server.log_file.name``); stop it with ``server.stop()``, then close ``server.log_file``."""
    from triton_vlm.launcher import ServerOptions, TritonServer
    from triton_vlm.launcher.server import port_in_use

    ports: list[int] = []
    port = 18000
    while len(ports) < 3:
        if not port_in_use("127.0.0.1", port):
            ports.append(port)
        port += 1
    import tempfile

    log_path = Path(tempfile.mkstemp(prefix="triton-vlm-bench-", suffix=".log")[1])
    print(f"[triton-vlm] starting a server for the benchmark; its log: {log_path}", flush=True)
    log_file = open(log_path, "w")  # noqa: SIM115 - written until stop(); run() closes it
    server = TritonServer(ServerOptions(models=(model,), tiny=tiny, preload=True, engine=engine,
                                        batch_delay_us=batch_delay_us,
                                        http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2]),
                          log_file=log_file)
    server.start()
    try:
        server.wait_until_ready(timeout=900)
    except BaseException:
        server.stop()
        log_file.close()
        raise
    return server


def _command() -> str:
    return "triton-vlm bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _environment() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    except ImportError:
        pass
    return info
