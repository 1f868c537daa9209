"""``triton-vlm``: serve models, ask them questions, build tiny test checkpoints."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from triton_vlm.errors import TritonVLMError


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
    serve.add_argument("--models", default="", help="comma-separated models (default: every servable one)")
    serve.add_argument("--tiny", action="store_true", help="serve tiny random-weight checkpoints (tests, demos)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to expose; default loopback)")
    serve.add_argument("--instance-kind", choices=("auto", "cpu", "gpu"), default="auto",
                       help="auto: GPU instances where a GPU exists, else CPU")
    serve.add_argument("--preload", action="store_true", help="load weights at start instead of on first request")
    serve.add_argument("--model-repository", type=Path, default=None)
    serve.add_argument("--log-verbose", type=int, default=0)
    serve.set_defaults(handler=_serve)

    infer = commands.add_parser("infer", help="ask a model about an image; prints only the generated text")
    infer.add_argument("--model", required=True)
    infer.add_argument("--image", required=True, type=Path)
    infer.add_argument("--prompt", required=True)
    where = infer.add_mutually_exclusive_group()
    where.add_argument("--url", default="localhost:8000", help="server address (HTTP, or gRPC with --grpc)")
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

    tiny = commands.add_parser("make-tiny", help="build the tiny random-weight checkpoints")
    tiny.add_argument("--families", default="llava,kosmos2")
    tiny.add_argument("--output", type=Path, default=None, help="directory (default: the tiny cache)")
    tiny.set_defaults(handler=_make_tiny)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from triton_vlm.launcher import ServerOptions, TritonServer

    options = ServerOptions(
        models=tuple(m for m in args.models.split(",") if m), model_repository=args.model_repository,
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port, host=args.host,
        tiny=args.tiny, preload=args.preload, instance_kind=args.instance_kind, log_verbose=args.log_verbose,
    )
    server = TritonServer(options)

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
        assert server.process is not None
        return server.process.wait()
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


def _make_tiny(args: argparse.Namespace) -> int:
    from triton_vlm.tiny import ensure_tiny_checkpoint

    for family in filter(None, args.families.split(",")):
        print(ensure_tiny_checkpoint(family, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
