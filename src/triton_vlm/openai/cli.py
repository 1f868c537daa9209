"""``triton-vlm openai``: run the OpenAI-compatible front alone, in front of a running Triton.

``triton-vlm serve --openai-port N`` starts this same process next to its tritonserver; the compose files run it
as the ``openai`` service. Every flag has an environment default, for containers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from triton_vlm.openai.config import MiB, OpenAIConfigError, OpenAIOptions, load_api_keys

log = logging.getLogger("triton_vlm.openai")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _origins(values: list[str] | None) -> tuple[str, ...]:
    items = values if values else [os.environ.get("TRITON_VLM_OPENAI_CORS_ORIGINS", "")]
    return tuple(o.strip() for value in items for o in value.split(",") if o.strip())


def add_access_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with ``serve``/``start``: keys, CORS, remote images."""
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
                             "$TRITON_VLM_API_KEY; several keys: comma-separated)")
    parser.add_argument("--api-key-file", default=None,
                        help="file with accepted API keys, one per line (default: $TRITON_VLM_API_KEY_FILE)")
    parser.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                        help="allow browser requests from ORIGIN (repeatable; '*' for any; default: none, or "
                             "$TRITON_VLM_OPENAI_CORS_ORIGINS, comma-separated)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        default=_env_bool("TRITON_VLM_OPENAI_ALLOW_REMOTE_IMAGES"),
                        help="fetch http(s) image URLs (default off: only data: URIs; size and time limited, "
                             "public addresses only)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--triton-grpc", default=os.environ.get("TRITON_VLM_TRITON_GRPC", "127.0.0.1:8001"),
                        help="Triton's gRPC address (default: $TRITON_VLM_TRITON_GRPC or 127.0.0.1:8001)")
    parser.add_argument("--host", default=os.environ.get("TRITON_VLM_OPENAI_HOST", "127.0.0.1"),
                        help="address to bind (default loopback; 0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("TRITON_VLM_OPENAI_PORT", "9000")))
    add_access_arguments(parser)
    parser.add_argument("--allow-private-image-hosts", action="store_true",
                        default=_env_bool("TRITON_VLM_OPENAI_ALLOW_PRIVATE_IMAGE_HOSTS"),
                        help="with --allow-remote-images: also fetch from loopback and private addresses")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (MiB, default 32)")
    parser.add_argument("--max-image-mb", type=float, default=20.0, help="largest image (MiB, default 20)")
    parser.add_argument("--remote-image-timeout", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--max-concurrent-requests", type=int, default=256,
                        help="requests in flight before answering 429 (default 256)")
    parser.add_argument("--max-concurrent-per-key", type=int, default=0,
                        help="requests in flight for each API key before answering it 429 (default 0: no "
                             "per-key bound)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may take in Triton before a 504 (default 600)")
    parser.add_argument("--no-playground", dest="playground", action="store_false",
                        help="do not serve the browser playground at /playground")
    parser.add_argument("--log-level", default=os.environ.get("TRITON_VLM_OPENAI_LOG_LEVEL", "warning"),
                        choices=("critical", "error", "warning", "info", "debug"))


def options_from_args(args: argparse.Namespace) -> OpenAIOptions:
    return OpenAIOptions(
        port=args.port, host=args.host, triton_grpc_url=args.triton_grpc,
        api_keys=load_api_keys(args.api_key, args.api_key_file),
        cors_origins=_origins(args.cors_origin), allow_remote_images=args.allow_remote_images,
        allow_private_image_hosts=args.allow_private_image_hosts,
        max_body_bytes=int(args.max_body_mb * MiB), max_image_bytes=int(args.max_image_mb * MiB),
        remote_image_timeout_s=args.remote_image_timeout, max_concurrent_requests=args.max_concurrent_requests,
        max_concurrent_per_key=args.max_concurrent_per_key, request_timeout_s=args.request_timeout, log_level=args.log_level, playground=args.playground,
    )


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    return serve(options)


def serve(options: OpenAIOptions) -> int:
    """Run the front in the foreground until SIGINT/SIGTERM."""
    try:
        import uvicorn

        from triton_vlm.openai.app import create_app
    except ImportError as exc:
        raise OpenAIConfigError(f"the OpenAI front needs the 'openai' extra ({exc.name} is missing): "
                                f"pip install 'triton-vlm[openai]'") from None
    if options.host not in LOOPBACK and not options.api_keys:
        print(f"[triton-vlm] warning: the OpenAI API listens on {options.host} without an API key; anyone who "
              f"can reach it can use it (--api-key or --api-key-file)", file=sys.stderr, flush=True)
    print(f"[triton-vlm] OpenAI API on {options.base_url} -> Triton gRPC {options.triton_grpc_url}"
          f"{' (API key required)' if options.api_keys else ''}", flush=True)
    uvicorn.run(create_app(options), host=options.host, port=options.port, log_level=options.log_level,
                access_log=options.log_level in ("info", "debug"), timeout_graceful_shutdown=5,
                server_header=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triton-vlm openai", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[triton-vlm] %(message)s")
    try:
        return run(args)
    except OpenAIConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
