"""``triton-vlm bench`` on a CPU with tiny models: the issue's command and its JSON schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import ROOT
from tests.integration.conftest import RunningServer

from triton_vlm.observability.phases import FIRST_TOKEN_PHASES

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "triton-vlm"


def test_bench_tiny_reports_served_runs_baseline_and_ratios(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        [str(CLI), "bench", "--tiny", "--model", "llava", "--concurrency", "1,4", "--requests", "4,8",
         "--max-tokens", "6", "--json", str(out), "--plot", str(png), "--api", "both",
         "--round-trip", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [(r["api"], r["concurrency"]) for r in runs] == [("stream", 1), ("stream", 4), ("infer", 1), ("infer", 4)]
    for run in runs:
        for key in ("concurrency", "output_tok_s", "requests_s", "ttft_p50_s", "itl_p50_s"):
            assert key in run
        assert run["errors"] == 0 and run["output_tok_s"] > 0
        assert run["output_tokens"] == 6 * (4 if run["concurrency"] == 1 else 8)  # EOS ignored
    assert all(r["ttft_p50_s"] > 0 and r["itl_p50_s"] > 0 for r in runs if r["api"] == "stream")
    assert [b["concurrency"] for b in report["baseline"]] == [1, 4]
    assert set(report["ratios"]) == {"stream_c1", "stream_c4", "infer_c1", "infer_c4"}
    for key, ratio in report["ratios"].items():  # against HF's first call; its repeat is recorded beside it
        run = next(r for r in runs if f"{r['api']}_c{r['concurrency']}" == key)
        first = next(b for b in report["baseline"] if b["concurrency"] == run["concurrency"])
        assert ratio == pytest.approx(run["output_tok_s"] / first["output_tok_s"])
        assert report["ratios_vs_repeated_baseline"][key] == pytest.approx(
            run["output_tok_s"] / first["repeated_tok_s"])
    assert [b["output_tokens"] for b in report["baseline"]] == [6, 4 * 6]  # one timed batch: the first call
    trip = report["round_trip"]
    assert trip["requests"] == 3 and trip["direct_p50_s"] > 0 and trip["served_p50_s"] > 0
    assert trip["overhead_p50_s"] == pytest.approx(trip["served_p50_s"] - trip["direct_p50_s"])
    assert set(report["scaling"]) == {"stream_c4_over_c1", "infer_c4_over_c1"}
    assert all(v > 0 for v in report["scaling"].values())
    assert "Triton round trip" in result.stdout and "throughput scaling" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "triton-vlm served" in result.stdout and "HF generate baseline" in result.stdout
    assert all(b["kind"] == "hf_generate_static_batch" for b in report["baseline"])


def test_bench_moondream2_baseline_is_the_in_process_batched_loop(tmp_path: Path) -> None:
    """moondream2 is native (no transformers generate): its baseline is the backend's loop, in-process."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [str(CLI), "bench", "--tiny", "--model", "moondream2", "--concurrency", "1,2", "--requests", "2",
         "--max-tokens", "4", "--api", "infer", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(b["concurrency"], b["kind"], b["output_tokens"]) for b in report["baseline"]] == [
        (1, "batched_generation_in_process", 4), (2, "batched_generation_in_process", 8)]
    assert [(r["api"], r["errors"], r["output_tokens"]) for r in report["runs"]] == [("infer", 0, 8), ("infer", 0, 8)]
    assert set(report["ratios"]) == {"infer_c1", "infer_c2"}
    assert "triton-vlm served (moondream2 through Triton: infer)" in result.stdout


def test_perf_analyzer_drives_the_served_model_with_the_bench_workload(triton: RunningServer, tmp_path: Path) -> None:
    """Triton's own client (bench/README.md's recipe) against the real server: every request is the workload's
    (an image, the prompt, max_tokens, EOS ignored), so its infer/s x max_tokens is the tokens the model made."""
    from triton_vlm.bench import perf_analyzer
    from triton_vlm.bench.workload import Workload
    from triton_vlm.observability.scrape import parse_metrics, value_of

    def generated() -> float:
        return value_of(parse_metrics(triton.metrics()), "triton_vlm_generated_tokens_total", model="llava") or 0.0

    workload = Workload(model="llava", image_size=64, max_tokens=5)
    before = generated()
    result = perf_analyzer.run(triton.grpc_url, "llava", 2, 6, workload, binary=perf_analyzer.find_binary(),
                               libs=perf_analyzer.default_libs(), work_dir=tmp_path)
    assert result.infer_s > 0 and result.output_tok_s == pytest.approx(result.infer_s * 5)
    assert 0 < result.latency_p50_s <= result.latency_p99_s
    # perf_analyzer sends a few warm-up requests of its own beside the 6 it measures: every one made 5 tokens.
    made = generated() - before
    assert made >= 6 * 5 and made % 5 == 0


def test_bench_chat_times_each_turn_of_conversations_against_a_running_server(triton: RunningServer,
                                                                            tmp_path: Path) -> None:
    """``--chat-turns 2``: turn 2 resends the image with turn 1's question and answer, so its prompt is longer."""
    out = tmp_path / "chat.json"
    result = subprocess.run(
        [str(CLI), "bench", "--model", "llava", "--url", triton.grpc_url, "--chat-turns", "2", "--conversations", "1",
         "--max-tokens", "4", "--image-size", "64", "--metrics-url", triton.server.metrics_url, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["errors"] == 0 and report["turn1_ttft_s"] > 0 and report["turn2_ttft_s"] > 0
    turn1, turn2 = report["samples"]
    assert (turn1["turn"], turn2["turn"]) == (1, 2) and turn1["generated_tokens"] == turn2["generated_tokens"] == 4
    assert turn2["prompt_tokens"] > turn1["prompt_tokens"] + 4  # the answer and the second question
    assert [t["prompt_tokens_p50"] for t in report["turns"]] == [turn1["prompt_tokens"], turn2["prompt_tokens"]]
    assert report["workload"]["turns"] == 2 and report["workload"]["conversations"] == 1
    assert "triton-vlm chat (llava: 1 conversations of 2 turns" in result.stdout
    # The engine's own count of what it prefilled during the timed turns (the warm-up's not among them): with the
    # prefix cache (on by default), turn 2 found turn 1's whole blocks (its prompt and answer) and prefilled the rest.
    counters = report["engine_counters"]
    assert (counters["prefix_cache_hits"], counters["prefix_cache_misses"]) == (1, 1)
    held = counters["prefix_cached_tokens"]
    assert turn1["prompt_tokens"] // 16 * 16 <= held <= turn1["prompt_tokens"] + 4 and held % 16 == 0
    assert counters["prefill_tokens"] == turn1["prompt_tokens"] + turn2["prompt_tokens"] - held
    # Each turn's first token, split by the server: every phase, together about the TTFT the client saw (which
    # adds the gRPC hops and Triton's queue).
    for sample, row in zip(report["samples"], report["turns"], strict=True):
        assert list(sample["phases"]) == list(FIRST_TOKEN_PHASES) == list(row["phases_p50_s"])
        assert 0 < sum(sample["phases"].values()) <= sample["ttft_s"]
    assert "turn 2 on the server, p50 ms: wait" in result.stdout
