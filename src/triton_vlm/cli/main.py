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
from typing import TYPE_CHECKING, Any

from triton_vlm.errors import TritonVLMError

if TYPE_CHECKING:
    from triton_vlm.availability import WeightsAvailability
    from triton_vlm.client.entities import Entity
    from triton_vlm.launcher import ServerOptions, TritonServer
    from triton_vlm.launcher.checkpoint import CheckpointRequest


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
    parser.add_argument("--version", action=_PrintVersion,
                        help="print the version of triton-vlm and of the server it runs, then exit")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run tritonserver (foreground) over the model repository, or over one checkpoint: "
                      "triton-vlm serve llava-hf/llava-1.5-7b-hf")
    serve.add_argument("source", nargs="?", metavar="MODEL_ID_OR_DIR", default=None,
                       help="serve this one checkpoint: a Hugging Face id or a checkpoint directory, its family "
                            "picked from its config.json (same as --model-id); a model of the repository is "
                            "served as with --models. Default: the repository's models (--models)")
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

    infer = commands.add_parser("infer", help="ask a model about an image; prints only the generated text "
                                              "(--json: text, token counts, finish reason, latency)")
    infer.add_argument("--model", required=True,
                       help="model to ask, as the server names it (llava, kosmos2, moondream2, smolvlm; "
                            "`triton-vlm status` lists them); not a <model>_stream one: those only stream")
    infer.add_argument("--image", required=True, type=Path, help="image file (JPEG, PNG, WebP, ...)")
    infer.add_argument("--prompt", required=True,
                       help="the question or instruction (kosmos2: start with <grounding> for boxes)")
    where = infer.add_mutually_exclusive_group()
    where.add_argument("--url", default=os.environ.get("TRITON_VLM_URL", "localhost:8000"),
                       help="server address: its HTTP port (default 8000), or with --grpc its gRPC port (default "
                            "8001) (default: $TRITON_VLM_URL or localhost:8000)")
    where.add_argument("--direct", action="store_true", help="run in this process, without Triton")
    infer.add_argument("--grpc", action="store_true",
                       help="talk gRPC instead of HTTP; --url must then name the gRPC port (8001 by default)")
    infer.add_argument("--tiny", action="store_true", help="with --direct: the tiny checkpoints")
    infer.add_argument("--max-tokens", type=int, default=None,
                       help="most tokens to generate (default: the model's default_max_tokens, 128)")
    infer.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0: greedy)")
    infer.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this share of the "
                                                                 "probability mass (default 1)")
    infer.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same answer)")
    infer.add_argument("--task", default=None,
                       help="a skill of models that have several (moondream2: query, caption[:short|normal|long], "
                            "detect, point)")
    infer.add_argument("--draw", type=Path, default=None, metavar="OUT.png",
                       help="also write the image with the answer's boxes drawn on it: kosmos2 entities (prompts "
                            "starting with <grounding>), moondream2 detect/point answers")
    infer.add_argument("--json", action="store_true",
                       help="print {text, generated_tokens, prompt_tokens, finish_reason, latency_s} as JSON")
    infer.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer (300)")
    infer.add_argument("--retries", type=int, default=0,
                       help="retry this many times, with backoff, while the server is unreachable or the model "
                            "UNAVAILABLE (e.g. still starting); never for invalid requests")
    infer.add_argument("--metrics-url", default=os.environ.get("TRITON_VLM_METRICS_URL"),
                       help="on a terminal, where to check whether the weights are still loading (default: the "
                            "--url host, port 8002)")
    infer.set_defaults(handler=_infer, verbose=False)

    openai = commands.add_parser("openai", help="run the OpenAI-compatible API (chat completions with images) in "
                                                "front of a running Triton")
    from triton_vlm.openai.cli import add_arguments as add_openai_arguments

    add_openai_arguments(openai)
    openai.set_defaults(handler=_openai)

    bench = commands.add_parser("bench", help="benchmark a served model against the HF-generate baseline")
    from triton_vlm.bench.cli import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(handler=_bench)

    add = commands.add_parser(
        "add-model", help="scaffold triton_models/NAME (config.pbtxt + 1/model.py) for a new model")
    add.add_argument("name", help="model name (the directory and the name clients use)")
    add.add_argument("--hf-model-id", required=True, help="Hugging Face model id of the weights")
    add.add_argument("--family", default="auto",
                     help="adapter family (default auto: any AutoModelForImageTextToText with a chat template)")
    add.add_argument("--revision", default="main", help="hub revision to pin (default main)")
    add.add_argument("--model-repository", type=Path, default=None,
                     help="where to write (default: the project's triton_models/)")
    add.add_argument("--force", action="store_true", help="overwrite an existing model directory")
    add.set_defaults(handler=_add_model)

    from triton_vlm.cli import dashboard as dashboard_cli
    from triton_vlm.cli import status as status_cli

    status = commands.add_parser("status", help="server, models, readiness, instance kinds and loaded weights")
    status_cli.add_arguments(status)
    status.set_defaults(handler=status_cli.run, verbose=False)

    preview = commands.add_parser(
        "dashboard-preview", help="render the Grafana dashboard's panels from a server's scraped metrics (PNG)")
    dashboard_cli.add_arguments(preview)
    preview.set_defaults(handler=dashboard_cli.run, verbose=False)

    tiny = commands.add_parser("make-tiny", help="build the tiny random-weight checkpoints")
    tiny.add_argument("--families", default="llava,kosmos2",
                      help="comma-separated families; FAMILY:VARIANT picks an architecture of auto (auto:idefics3)")
    tiny.add_argument("--output", type=Path, default=None, help="directory (default: the tiny cache)")
    tiny.set_defaults(handler=_make_tiny)
    return parser


class _PrintVersion(argparse.Action):
    """``--version``: argparse's own action wraps the line at the terminal's width; this prints it whole, and
    reads the installed versions only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(version_line(), flush=True)
        parser.exit()


def version_line() -> str:
    """``triton-vlm X (tritonserver Y from nvidia-pytriton Z, Python W)``; parts that are not installed are
    left out."""
    import importlib.metadata
    import platform

    from triton_vlm import __version__

    def installed(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    parts = []
    pytriton = installed("nvidia-pytriton")
    if pytriton:
        # The server each nvidia-pytriton release ships (its release notes); the launcher runs that one.
        server = {"0.7.0": "2.51.0"}.get(pytriton)
        parts.append(f"tritonserver {server} from nvidia-pytriton {pytriton}" if server
                     else f"nvidia-pytriton {pytriton}")
    if os.environ.get("TRITON_VLM_TRITON_HOME"):
        parts.append(f"TRITON_VLM_TRITON_HOME={os.environ['TRITON_VLM_TRITON_HOME']}")
    torch = installed("torch")
    if torch:
        parts.append(f"torch {torch}")
    parts.append(f"Python {platform.python_version()}")
    return f"triton-vlm {installed('triton-vlm') or __version__} ({', '.join(parts)})"


def _env_flag(name: str) -> bool:
    from triton_vlm.config import parse_bool

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
    parser.add_argument("--model-id", default=os.environ.get("TRITON_VLM_MODEL_ID") or None,
                        metavar="MODEL_ID_OR_DIR",
                        help="serve one checkpoint instead of the repository's models: a Hugging Face id or a "
                             "checkpoint directory; its family is picked from its config.json's architectures "
                             "(default: $TRITON_VLM_MODEL_ID)")
    parser.add_argument("--name", default=os.environ.get("TRITON_VLM_MODEL_NAME") or None,
                        help="with a checkpoint: the name clients use (default: $TRITON_VLM_MODEL_NAME, else the "
                             "last part of the id or directory, e.g. llava-1.5-7b-hf)")
    parser.add_argument("--family", default=os.environ.get("TRITON_VLM_MODEL_FAMILY") or None,
                        help="with a checkpoint: its family instead of the one its config.json picks; auto serves "
                             "any AutoModelForImageTextToText with a chat template (default: "
                             "$TRITON_VLM_MODEL_FAMILY)")
    parser.add_argument("--revision", default=os.environ.get("TRITON_VLM_MODEL_REVISION") or "main",
                        help="with a Hugging Face id: the revision (default: $TRITON_VLM_MODEL_REVISION, else main)")
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
                             "(default: no bound for batched models, 256 in the engine models)")
    parser.add_argument("--queue-timeout-ms", type=int, default=None,
                        help="refuse requests still queued after this long (default: no limit)")
    parser.add_argument("--batch-delay-us", type=int, default=None,
                        help="how long a batch may wait for more requests, in microseconds (Triton's "
                             "max_queue_delay_microseconds; default: config.pbtxt's, 0: run at once)")
    parser.add_argument("--model-repository", type=Path, default=None)
    parser.add_argument("--log-verbose", type=int, default=0)
    from triton_vlm.openai.cli import add_access_arguments

    openai_port = os.environ.get("TRITON_VLM_OPENAI_PORT")
    parser.add_argument("--openai-port", type=int, default=int(openai_port) if openai_port else None,
                        help="also serve the OpenAI-compatible API (/v1/chat/completions) on this port "
                             "(default: $TRITON_VLM_OPENAI_PORT, else off); see docs/openai.md")
    add_access_arguments(parser)


def _server_options(args: argparse.Namespace) -> ServerOptions:
    from triton_vlm.launcher import ServerOptions

    openai = None
    if args.openai_port is not None:
        from triton_vlm.openai import OpenAIOptions, load_api_keys
        from triton_vlm.openai.cli import _origins

        host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        openai = OpenAIOptions(port=args.openai_port, host=args.host, triton_grpc_url=f"{host}:{args.grpc_port}",
                               api_keys=load_api_keys(args.api_key, args.api_key_file),
                               cors_origins=_origins(args.cors_origin),
                               allow_remote_images=args.allow_remote_images)
    elif args.api_key or args.api_key_file or args.cors_origin or args.allow_remote_images:
        print("[triton-vlm] note: --api-key, --api-key-file, --cors-origin and --allow-remote-images apply to "
              "the OpenAI API, which runs only with --openai-port", file=sys.stderr, flush=True)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    checkpoint = _checkpoint_request(args)
    if checkpoint is not None and not models and args.model_repository is None and _repository_has(checkpoint):
        models, checkpoint = (checkpoint.source,), None  # `triton-vlm serve llava`: the repository's llava
    return ServerOptions(
        models=models, checkpoint=checkpoint,
        model_repository=args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, host=args.host, tiny=args.tiny, preload=args.preload,
        instance_kind=args.instance_kind, log_verbose=args.log_verbose, engine=args.engine, openai=openai,
        max_queue_size=args.max_queue_size, queue_timeout_ms=args.queue_timeout_ms,
        batch_delay_us=args.batch_delay_us,
    )


def _checkpoint_request(args: argparse.Namespace) -> CheckpointRequest | None:
    """The checkpoint that ``serve MODEL_ID_OR_DIR`` or ``--model-id`` names, with --name, --family, --revision."""
    from triton_vlm.launcher.checkpoint import CheckpointRequest
    from triton_vlm.launcher.distribution import LauncherError

    positional = getattr(args, "source", None)  # serve's; start has --model-id only
    if positional and args.model_id and positional != args.model_id:
        raise LauncherError(f"two checkpoints: {positional} and --model-id {args.model_id} (or "
                            "$TRITON_VLM_MODEL_ID); serve one")
    source = positional or args.model_id
    if source is None:
        given = [flag for flag, value in (("--name", args.name), ("--family", args.family),
                                          ("--revision", args.revision != "main")) if value]
        if given:
            raise LauncherError(f"{', '.join(given)} apply to a checkpoint: name one (triton-vlm serve "
                                "MODEL_ID_OR_DIR, or --model-id); add-model writes an entry into the repository")
        return None
    return CheckpointRequest(source=source, name=args.name, family=args.family, revision=args.revision)


def _repository_has(checkpoint: CheckpointRequest) -> bool:
    """Whether what ``serve NAME`` names is a model of the project's repository rather than a hub id (no ``/``) or
    a directory: ``triton-vlm serve llava`` is ``--models llava``."""
    from triton_vlm.launcher.repository import default_model_repository, list_models

    if "/" in checkpoint.source or Path(checkpoint.source).expanduser().exists():
        return False
    try:
        known = checkpoint.source in list_models(default_model_repository())
    except (TritonVLMError, OSError):  # no repository here (an installed package): a hub id, then
        return False
    if known and (checkpoint.name or checkpoint.family or checkpoint.revision != "main"):
        raise TritonVLMError(f"{checkpoint.source} is a model of the repository: --name, --family and --revision "
                             "apply to checkpoints (a Hugging Face id owner/name or a directory)")
    return known


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
    checkpoint = options.checkpoint
    if checkpoint is not None and plan.mode != "embedded" and Path(checkpoint.source).expanduser().exists():
        raise LauncherError(f"{checkpoint.source} is a directory of this host, which the {plan.mode} "
                            "container does not see: serve it with --mode embedded, or give its Hugging Face id")
    if args.dry_run:
        for line in host.describe():
            say(f"[triton-vlm] {line}")
        if plan.mode == "embedded" and checkpoint is not None:
            from triton_vlm.launcher.checkpoint import resolve_checkpoint

            say(f"[triton-vlm] would serve {resolve_checkpoint(checkpoint).describe()}")
        if plan.mode == "embedded":
            say("[triton-vlm] would run: triton-vlm serve (embedded tritonserver)")
        else:
            say(f"[triton-vlm] would run: {' '.join(compose_command(host.compose, compose_file(plan.mode)))}")
        return 0
    ports = [("HTTP", options.http_port), ("gRPC", options.grpc_port), ("metrics", options.metrics_port)]
    if options.openai is not None:
        ports.append(("OpenAI", options.openai.port))
    for name, port in ports:
        if port_in_use(options.host, port):
            raise LauncherError(f"{name} port {port} is already in use by another program (another "
                                f"tritonserver?): stop it, or choose another port with --{name.lower()}-port")
    if plan.mode == "embedded":
        return _serve(args)
    ignored = [flag for flag, value in (("--instance-kind", args.instance_kind != "auto"),
                                        ("--model-repository", args.model_repository is not None),
                                        ("--log-verbose", args.log_verbose != 0),
                                        ("--max-queue-size", args.max_queue_size is not None),
                                        ("--queue-timeout-ms", args.queue_timeout_ms is not None),
                                        ("--batch-delay-us", args.batch_delay_us is not None)) if value]
    if ignored:
        say(f"[triton-vlm] note: {', '.join(ignored)} only apply to --mode embedded; the container uses "
            f"{plan.mode.upper()} instances and its own model repository")
    return run_compose(plan.mode, host.compose, options)


def _serve(args: argparse.Namespace) -> int:
    import dataclasses
    import tempfile

    from triton_vlm.backend.stub_logging import STARTUP_ERRORS_ENV
    from triton_vlm.launcher import LauncherError, TritonServer

    options = _server_options(args)
    # Where the models write why they failed at start (see stub_logging.startup_failed): said last, below.
    errors_fd, errors_name = tempfile.mkstemp(prefix="triton-vlm-startup-", suffix=".txt")
    os.close(errors_fd)
    errors_path = Path(errors_name)
    options = dataclasses.replace(options, extra_env={**options.extra_env, STARTUP_ERRORS_ENV: str(errors_path)})
    server = TritonServer(options)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.start()
        missing = [] if server.options.tiny else _models_without_weights(server)
        server.wait_until_ready()
        print(f"[triton-vlm] ready: models {', '.join(server.models)}\n"
              f"[triton-vlm]   HTTP     http://{server.http_url}\n"
              f"[triton-vlm]   gRPC     {server.grpc_url}\n"
              f"[triton-vlm]   metrics  {server.metrics_url}\n"
              + (f"[triton-vlm]   OpenAI   {server.options.openai.base_url}\n" if server.options.openai else "")
              + "[triton-vlm] Ctrl-C to stop", flush=True)
        if missing:
            from triton_vlm.availability import missing_weights_note

            print("\n".join(f"[triton-vlm] note: {line}" for line in missing_weights_note(missing).splitlines()),
                  flush=True)
        return server.wait()  # across restarts after a crash (see TritonServer.wait)
    except KeyboardInterrupt:
        print("[triton-vlm] stopping", flush=True)
        return 0
    except LauncherError as exc:
        server.stop()
        reasons = _startup_errors(errors_path)
        if not reasons:
            raise
        # Last and plain, below Triton's tables and tracebacks.
        print("\n".join([f"error: the server did not start: {exc}", *[f"  {line}" for line in reasons]]),
              file=sys.stderr, flush=True)
        return 1
    finally:
        server.stop()
        errors_path.unlink(missing_ok=True)


def _startup_errors(path: Path) -> list[str]:
    """The reasons models gave for failing at start, each once (a model's instances may each give it)."""
    try:
        return list(dict.fromkeys(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    except OSError:
        return []


def _models_without_weights(server: TritonServer) -> list[WeightsAvailability]:
    """The served models whose weights cannot be had here (said after the ready lines, so they are seen)."""
    from triton_vlm.availability import repository_availability

    if server.repository is None:
        return []
    try:
        return [found for found in repository_availability(server.repository, server.models) if not found.available]
    except (TritonVLMError, OSError) as exc:  # the server's own start reports a broken repository better
        logging.getLogger("triton_vlm").debug("weights check skipped: %s", exc)
        return []


def _infer(args: argparse.Namespace) -> int:
    import contextlib
    import time

    from triton_vlm.cli.output import Spinner, is_terminal, loading_message, print_result
    from triton_vlm.client.entities import parse_entities

    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    # The spinner only where a person watches; pipes and scripts get the text (or --json) alone.
    friendly = is_terminal(sys.stdout) and is_terminal(sys.stderr) and not args.json
    if args.direct:
        from triton_vlm.client import InferenceResult
        from triton_vlm.direct import direct_infer, direct_runtime

        runtime = direct_runtime(args.model, tiny=args.tiny)
        spinner = Spinner(sys.stderr, lambda: f"loading {args.model} and generating in this process")
        started = time.perf_counter()
        with spinner if friendly else contextlib.nullcontext():
            output = direct_infer(runtime, args.image, args.prompt, task=args.task, **sampling)
        result = InferenceResult(output.text, len(output.token_ids), output.prompt_tokens, output.finish_reason,
                                 time.perf_counter() - started,
                                 entities=parse_entities(output.extras.get("entities", "[]")))
    else:
        from triton_vlm.cli.addresses import metrics_address
        from triton_vlm.cli.hints import explain_unreachable
        from triton_vlm.client import TritonVLMClient
        from triton_vlm.errors import ServerUnreachableError

        with TritonVLMClient(args.url, protocol="grpc" if args.grpc else "http", timeout=args.timeout,
                             retry=args.retries) as client:
            metrics_url = metrics_address(client.url, args.metrics_url).url
            spinner = Spinner(sys.stderr, lambda: loading_message(args.model, metrics_url))
            with spinner if friendly else contextlib.nullcontext():
                try:
                    result = client.infer_result(args.model, args.image, args.prompt, task=args.task, **sampling)
                except ServerUnreachableError as exc:
                    raise explain_unreachable(exc, client.url, client.protocol) from None
    print_result(result, model=args.model, as_json=args.json)
    if args.draw:
        _draw(args.image, args.draw, result.text, result.entities, label=args.prompt)
    return 0


def _openai(args: argparse.Namespace) -> int:
    from triton_vlm.openai.cli import run

    return run(args)


def _draw(image_path: Path, out: Path, text: str, entities: list[Entity], label: str) -> None:
    """Write ``image_path`` with the boxes of ``entities`` (or of a detect/point JSON answer) to ``out``."""
    from triton_vlm.client.entities import draw_entities, entities_from_answer
    from triton_vlm.images import decode_image

    entities = entities or entities_from_answer(text, label=label.strip())
    image = decode_image(Path(image_path).read_bytes(), max_bytes=1 << 62, max_pixels=1 << 62)  # as the server
    try:
        draw_entities(image, entities).save(out)
    except (OSError, ValueError) as exc:
        raise TritonVLMError(f"--draw: cannot write {str(out)!r}: {exc}") from None
    boxes = sum(len(e.boxes_px) for e in entities)
    print(f"[triton-vlm] drew {len(entities)} entit{'y' if len(entities) == 1 else 'ies'} ({boxes} boxes/points) "
          f"on {out}", file=sys.stderr)


def _bench(args: argparse.Namespace) -> int:
    from triton_vlm.bench.cli import run

    return run(args)


def _add_model(args: argparse.Namespace) -> int:
    from triton_vlm.launcher.repository import default_model_repository
    from triton_vlm.launcher.scaffold import add_model

    repository = args.model_repository or default_model_repository()
    target = add_model(repository, args.name, args.hf_model_id, family=args.family, revision=args.revision,
                       force=args.force)
    print(f"[triton-vlm] wrote {target / 'config.pbtxt'} and {target / '1' / 'model.py'}\n"
          f"[triton-vlm] serve it: ./triton_start.sh --models {args.name}   (add --tiny for random test weights)")
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from triton_vlm.tiny import ensure_tiny_checkpoint

    for item in filter(None, args.families.split(",")):
        family, _, variant = item.partition(":")
        print(ensure_tiny_checkpoint(family, args.output, variant=variant or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
