"""``triton-vlm``: serve models, ask them questions, build tiny test checkpoints."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from triton_vlm.errors import TritonVLMError

if TYPE_CHECKING:
    from triton_vlm.launcher import ServerOptions


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", True) else logging.WARNING,
                        format="[triton-vlm] %(message)s")
    try:
        return int(args.handler(args) or 0)
    except TritonVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triton-vlm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run tritonserver over the model repository (foreground)")
    _add_server_arguments(serve)
    serve.set_defaults(handler=_serve)

    start = commands.add_parser(
        "start", help="detect the host and run the server the best way: Docker with a GPU, Docker on CPU, or "
                      "embedded (what ./triton_start.sh runs)")
    start.add_argument("--mode", choices=("auto", "gpu", "cpu", "embedded"),
                       default=os.environ.get("TRITON_VLM_MODE", "auto"),
                       help="auto (default, or $TRITON_VLM_MODE): gpu = docker-compose.yml, cpu = "
                            "docker-compose-cpu.yml, embedded = the tritonserver from the Python wheel")
    start.add_argument("--dry-run", action="store_true", help="print what was detected and what would run; "
                                                              "start nothing")
    _add_server_arguments(start)
    start.set_defaults(handler=_start)

    infer = commands.add_parser("infer", help="ask a model about an image; prints only the generated text")
    infer.add_argument("--model", required=True)
    infer.add_argument("--image", required=True, type=Path)
    infer.add_argument("--prompt", required=True)
    where = infer.add_mutually_exclusive_group()
    where.add_argument("--url", default=os.environ.get("TRITON_VLM_URL", "localhost:8000"),
                       help="server address, HTTP or gRPC with --grpc (default: $TRITON_VLM_URL or localhost:8000)")
    where.add_argument("--direct", action="store_true", help="run in this process, without Triton")
    infer.add_argument("--grpc", action="store_true", help="talk gRPC instead of HTTP")
    infer.add_argument("--tiny", action="store_true", help="with --direct: the tiny checkpoints")
    infer.add_argument("--max-tokens", type=int, default=None)
    infer.add_argument("--temperature", type=float, default=None)
    infer.add_argument("--top-p", type=float, default=None)
    infer.add_argument("--seed", type=int, default=None)
    infer.add_argument("--task", default=None,
                       help="a skill of models that have several (moondream2: query, caption[:short|normal|long], "
                            "detect, point)")
    infer.set_defaults(handler=_infer, verbose=False)

    bench = commands.add_parser("bench", help="benchmark a served model against the HF-generate baseline")
    from triton_vlm.bench.cli import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(handler=_bench)

    tiny = commands.add_parser("make-tiny", help="build the tiny random-weight checkpoints")
    tiny.add_argument("--families", default="llava,kosmos2")
    tiny.add_argument("--output", type=Path, default=None, help="directory (default: the tiny cache)")
    tiny.set_defaults(handler=_make_tiny)
    return parser


def _env_flag(name: str) -> bool:
    from triton_vlm.settings import parse_bool

    try:
        return parse_bool(os.environ.get(name, ""), name=name)
    except TritonVLMError:
        return False


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``serve`` and ``start``; --models, --tiny and --preload default to $TRITON_VLM_MODELS,
    $TRITON_VLM_TINY and $TRITON_VLM_PRELOAD (how containers are configured)."""
    parser.add_argument("--models", default=os.environ.get("TRITON_VLM_MODELS", ""),
                        help="comma-separated models (default: $TRITON_VLM_MODELS, else every servable one)")
    parser.add_argument("--tiny", action="store_true", default=_env_flag("TRITON_VLM_TINY"),
                        help="serve tiny random-weight checkpoints (tests, demos)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 to expose; default loopback)")
    parser.add_argument("--instance-kind", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: GPU instances where a GPU exists, else CPU")
    parser.add_argument("--preload", action="store_true", default=_env_flag("TRITON_VLM_PRELOAD"),
                        help="load weights at start instead of on first request")
    parser.add_argument("--engine", choices=("auto", "on", "off"), default=os.environ.get("TRITON_VLM_ENGINE", "auto"),
                        help="route public models through their <model>_stream engine (auto: on GPU hosts)")
    parser.add_argument("--max-queue-size", type=int, default=None,
                        help="requests each model may queue; more are refused at once with UNAVAILABLE "
                             "(default: config.pbtxt's, 64)")
    parser.add_argument("--queue-timeout-ms", type=int, default=None,
                        help="refuse requests still queued after this long (default: no limit)")
    parser.add_argument("--model-repository", type=Path, default=None)
    parser.add_argument("--log-verbose", type=int, default=0)


def _server_options(args: argparse.Namespace) -> ServerOptions:
    from triton_vlm.launcher import ServerOptions

    return ServerOptions(
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        model_repository=args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, host=args.host, tiny=args.tiny, preload=args.preload,
        instance_kind=args.instance_kind, log_verbose=args.log_verbose, engine=args.engine,
        max_queue_size=args.max_queue_size, queue_timeout_ms=args.queue_timeout_ms,
    )


def _start(args: argparse.Namespace) -> int:
    from triton_vlm.launcher.compose import compose_command, compose_file, run_compose
    from triton_vlm.launcher.detect import choose_mode, probe_host
    from triton_vlm.launcher.distribution import LauncherError
    from triton_vlm.launcher.server import port_in_use

    options = _server_options(args)
    host = probe_host()
    plan = choose_mode(args.mode, host)
    say = functools.partial(print, flush=True)
    say(f"[triton-vlm] mode: {plan.mode} ({plan.reason})")
    for note in plan.notes:
        say(f"[triton-vlm] note: {note}")
    if args.dry_run:
        for line in host.describe():
            say(f"[triton-vlm] {line}")
        if plan.mode == "embedded":
            say("[triton-vlm] would run: triton-vlm serve (embedded tritonserver)")
        else:
            say(f"[triton-vlm] would run: {' '.join(compose_command(host.compose, compose_file(plan.mode)))}")
        return 0
    for name, port in (("HTTP", options.http_port), ("gRPC", options.grpc_port),
                       ("metrics", options.metrics_port)):
        if port_in_use(options.host, port):
            raise LauncherError(f"{name} port {port} is already in use by another program (another "
                                f"tritonserver?): stop it, or choose another port with --{name.lower()}-port")
    if plan.mode == "embedded":
        return _serve(args)
    ignored = [flag for flag, value in (("--instance-kind", args.instance_kind != "auto"),
                                        ("--model-repository", args.model_repository is not None),
                                        ("--log-verbose", args.log_verbose != 0),
                                        ("--max-queue-size", args.max_queue_size is not None),
                                        ("--queue-timeout-ms", args.queue_timeout_ms is not None)) if value]
    if ignored:
        say(f"[triton-vlm] note: {', '.join(ignored)} only apply to --mode embedded; the container uses "
            f"{plan.mode.upper()} instances and its own model repository")
    return run_compose(plan.mode, host.compose, options)


def _serve(args: argparse.Namespace) -> int:
    from triton_vlm.launcher import TritonServer

    server = TritonServer(_server_options(args))

    def _stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.start()
        server.wait_until_ready()
        print(f"[triton-vlm] ready: models {', '.join(server.models)}\n"
              f"[triton-vlm]   HTTP     http://{server.http_url}\n"
              f"[triton-vlm]   gRPC     {server.grpc_url}\n"
              f"[triton-vlm]   metrics  {server.metrics_url}\n"
              f"[triton-vlm] Ctrl-C to stop", flush=True)
        return server.wait()  # across restarts after a crash (see TritonServer.wait)
    except KeyboardInterrupt:
        print("[triton-vlm] stopping", flush=True)
        return 0
    finally:
        server.stop()


def _infer(args: argparse.Namespace) -> int:
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.direct:
        from triton_vlm.direct import direct_infer, direct_runtime

        runtime = direct_runtime(args.model, tiny=args.tiny)
        print(direct_infer(runtime, args.image, args.prompt, task=args.task, **sampling).text)
        return 0
    from triton_vlm.client import TritonVLMClient

    with TritonVLMClient(args.url, protocol="grpc" if args.grpc else "http") as client:
        print(client.infer(args.model, args.image, args.prompt, task=args.task, **sampling))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from triton_vlm.bench.cli import run

    return run(args)


def _make_tiny(args: argparse.Namespace) -> int:
    from triton_vlm.tiny import ensure_tiny_checkpoint

    for family in filter(None, args.families.split(",")):
        print(ensure_tiny_checkpoint(family, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
