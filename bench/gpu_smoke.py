"""GPU smoke run through the real Triton (bench/gpu_smoke.sh): tiny llava and kosmos2 on KIND_GPU instances, the
public llava forwarding to its engine, a stream, a grounded kosmos2 answer, and the GPU and triton_vlm metrics."""

from __future__ import annotations

import re
import sys
import time
import urllib.request

from triton_vlm.bench.workload import Workload
from triton_vlm.client import TritonVLMClient
from triton_vlm.launcher import ServerOptions, TritonServer
from triton_vlm.launcher.server import port_in_use

WANTED = re.compile(r"^(nv_gpu_utilization|nv_gpu_memory_used_bytes|nv_inference_request_success|"
                    r"triton_vlm_(generated_tokens_total|time_to_first_token_seconds_count|model_loaded|engine_steps_total))\{")


def main() -> int:
    ports = [p for p in range(18000, 18100) if not port_in_use("127.0.0.1", p)][:3]
    server = TritonServer(ServerOptions(models=("llava", "kosmos2"), tiny=True, preload=True, http_port=ports[0],
                                        grpc_port=ports[1], metrics_port=ports[2]),
                          log_file=open("/tmp/triton-vlm-smoke.log", "w"))
    server.start()
    code = None
    try:
        server.wait_until_ready(timeout=400)
        image = Workload(model="llava").image(0)
        with TritonVLMClient(server.grpc_url, protocol="grpc") as client:  # the GPU host has no gevent (HTTP client)
            for _ in range(3):
                started = time.perf_counter()
                result = client.infer_result("llava", image, "What is in this image?", max_tokens=32, ignore_eos=True)
                print(f"llava infer: {result.generated_tokens} tokens in {time.perf_counter() - started:.3f}s")
            pieces = list(client.stream("llava", image, "Describe it.", max_tokens=32, ignore_eos=True))
            print(f"llava stream: {len(pieces)} pieces")
            grounded = client.infer_result("kosmos2", image, "<grounding> An image of", max_tokens=16)
            print(f"kosmos2: {grounded.generated_tokens} tokens, entities {grounded.entities}")
            print("models:", client.list_models())
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        for line in metrics.splitlines():
            if WANTED.match(line):
                print(line)
    finally:
        code = server.stop()
    print(f"tritonserver exit code: {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
