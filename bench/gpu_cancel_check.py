"""Whole-answer requests that their clients give up on stop in the engine: a check through the real server.

Starts a server for MODEL the way `triton-vlm serve` does (on a GPU host the public model forwards to
``<MODEL>_stream``), sends REQUESTS plain gRPC infers at once with a client deadline far shorter than their
answers, and checks that every one ends with DEADLINE_EXCEEDED, that the engine aborts each of them before its
``max_tokens`` (from the server log), that every KV slot is free afterwards, and that the model answers the next
request. Prints a JSON summary; exits 1 if a check fails.

python -m bench.gpu_cancel_check --model kosmos2 [--requests 16 --max-tokens 600 --deadline-s 0.5] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from triton_vlm.bench.cli import start_server
from triton_vlm.bench.workload import Workload
from triton_vlm.client import TritonVLMClient
from triton_vlm.errors import RequestTimeoutError, TritonVLMError

ABORTED = re.compile(r"engine: request \S+ aborted after (\d+) tokens; its KV slot is free again \((\d+) of (\d+)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kosmos2")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=600)
    parser.add_argument("--deadline-s", type=float, default=0.5)
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints, the engine on (a CPU dry run)")
    args = parser.parse_args()
    workload = Workload(args.model, prompt="What is in this image?", max_tokens=args.max_tokens)

    def ask(client: TritonVLMClient, index: int, max_tokens: int = workload.max_tokens) -> None:
        client.infer_result(args.model, workload.image(index), workload.prompt, max_tokens=max_tokens,
                            ignore_eos=True)

    server = start_server(args.model, tiny=args.tiny, engine="on" if args.tiny else "auto")
    log_path = Path(server.log_file.name)
    try:
        client = TritonVLMClient(server.grpc_url, protocol="grpc")
        impatient = TritonVLMClient(server.grpc_url, protocol="grpc", timeout=args.deadline_s)
        warm = time.perf_counter()
        ask(client, 0)
        full_answer_s = time.perf_counter() - warm

        def give_up(index: int) -> str:
            try:
                ask(impatient, index + 1)
            except RequestTimeoutError:  # gRPC's DEADLINE_EXCEEDED
                return "deadline exceeded"
            except TritonVLMError as exc:
                return f"{type(exc).__name__}: {exc}"
            return "answered"

        mark = len(log_path.read_text(errors="replace"))
        with ThreadPoolExecutor(args.requests) as pool:
            statuses = list(pool.map(give_up, range(args.requests)))
        deadline = time.monotonic() + 30
        aborts: list[tuple[str, str, str]] = []
        while time.monotonic() < deadline and len(aborts) < args.requests:
            time.sleep(0.2)
            aborts = ABORTED.findall(log_path.read_text(errors="replace")[mark:])
        after = time.perf_counter()
        ask(client, 99, max_tokens=4)
        next_answer_s = time.perf_counter() - after
        client.close()
        impatient.close()
    finally:
        server.stop()
    tokens = [int(t) for t, _, _ in aborts]
    summary = {
        "model": args.model, "requests": args.requests, "max_tokens": args.max_tokens, "deadline_s": args.deadline_s,
        "full_answer_s": round(full_answer_s, 3), "client_statuses": sorted(set(statuses)),
        "engine_aborts": len(aborts), "tokens_when_aborted": tokens,
        "slots_free_after_last_abort": "/".join(aborts[-1][1:]) if aborts else None,
        "next_answer_s": round(next_answer_s, 3),
    }
    ok = (statuses == ["deadline exceeded"] * args.requests and len(aborts) == args.requests
          and all(t < args.max_tokens for t in tokens) and aborts[-1][1] == aborts[-1][2])
    summary["ok"] = ok
    print(json.dumps(summary, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
