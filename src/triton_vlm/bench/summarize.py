"""The summary files the GPU issues ask for, from raw ``triton-vlm bench --json`` reports.

python -m triton_vlm.bench.summarize RAW.json --decoder-params 6.74e9 \
    --command "MODEL=llava bash bench/gpu_triton_run.sh" --out bench/results/h100-llava.json

``roofline_b1_tok_s`` is memory bandwidth (3.0 TB/s, a practical H100 figure) over the bytes one decode step
reads at batch 1: the language model's weights (fp16/bf16: 2 bytes a parameter).

The prefix cache (``bench/gpu_chat_run.sh``): the chat benchmark against a server with the cache on and one with it
off, and the standard stream benchmark at 64 clients against each:

python -m triton_vlm.bench.summarize chat chat-on.json chat-off.json --c64-on c64-on.json --c64-off c64-off.json \
    --command "bash bench/gpu_chat_run.sh" --out bench/results/h100-llava-chat.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

BANDWIDTH_B_S = 3.0e12


def summarize(raw: dict[str, Any], decoder_params: float, command: str, notes: list[str] | None = None) -> dict[str, Any]:
    """The summary of ``raw`` (a report with concurrency 1 and 64): streamed runs are the headline where there are
    any, plain infer rides along; ``command`` is what produced ``raw``; the raw report is kept under ``raw``."""
    def run(api: str, concurrency: int) -> dict[str, Any] | None:
        return next((r for r in raw["runs"] if r["api"] == api and r["concurrency"] == concurrency), None)

    def baseline(concurrency: int) -> dict[str, Any]:
        return next(b for b in raw["baseline"] if b["concurrency"] == concurrency)

    headline = "stream" if run("stream", 1) else "infer"
    b1, c64 = run(headline, 1), run(headline, 64)
    assert b1 is not None and c64 is not None, "the report needs concurrency 1 and 64"
    summary: dict[str, Any] = {
        "gpu": raw["gpu"],
        "served_b1_tok_s": b1["output_tok_s"],
        "served_c64_tok_s": c64["output_tok_s"],
        # HF's first call at the run's shapes, as the issue measured it; its repeat (cuDNN's plans built) beside.
        "hf_b1_tok_s": baseline(1)["output_tok_s"],
        "hf_c64_tok_s": baseline(64)["output_tok_s"],
        "hf_b1_repeated_tok_s": baseline(1).get("repeated_tok_s"),
        "hf_c64_repeated_tok_s": baseline(64).get("repeated_tok_s"),
        # Streaming: time to the first token. Plain infer has no first token to time: the whole answer's latency.
        "ttft_b1_s": b1["ttft_p50_s"],
        "ttft_is_whole_answer_latency": headline == "infer",
        "roofline_b1_tok_s": BANDWIDTH_B_S / (2 * decoder_params),
        "served_api": headline,
        "baseline_kind": baseline(1)["kind"],
        "command": command,
        "bench_command": raw["command"],  # what ``command`` ran, as triton-vlm bench recorded it
        "workload": raw["workload"],
    }
    infer_b1, infer_c64 = run("infer", 1), run("infer", 64)
    if headline == "stream" and infer_b1 is not None and infer_c64 is not None:
        summary["served_infer_b1_tok_s"] = infer_b1["output_tok_s"]
        summary["served_infer_c64_tok_s"] = infer_c64["output_tok_s"]
    if notes:
        summary["notes"] = notes
    summary["ratios"] = raw["ratios"]
    if "ratios_vs_repeated_baseline" in raw:
        summary["ratios_vs_repeated_baseline"] = raw["ratios_vs_repeated_baseline"]
    summary["raw"] = raw
    return summary


def summarize_chat(on: dict[str, Any], off: dict[str, Any], command: str, c64_on: dict[str, Any] | None = None,
                   c64_off: dict[str, Any] | None = None, notes: list[str] | None = None,
                   image_cache_off: dict[str, Any] | None = None) -> dict[str, Any]:
    """The prefix cache's summary: the chat benchmark's reports with the cache on (``on``) and off (``off``), the
    standard benchmark's with streamed runs at 64 clients (several: their median and each) where given. The cache
    is the only difference the two chat reports may have. ``image_cache_off``: a third chat report, the prefix
    cache on but images decoded and processed again every turn (``image_cache_mb: 0``), keys ``_noimagecache``."""
    for other in (off, image_cache_off):
        if other is not None and on["workload"] != other["workload"]:
            raise ValueError(f"the chat runs' workloads differ: on {on['workload']}, other {other['workload']}")
    summary: dict[str, Any] = {
        "gpu": on.get("gpu"),
        "turn1_ttft_s": on["turn1_ttft_s"],
        "turn2_ttft_s": on["turn2_ttft_s"],
        "turn2_ttft_nocache_s": off["turn2_ttft_s"],
        "turn1_ttft_nocache_s": off["turn1_ttft_s"],
        "turn2_over_turn1": on["turn2_ttft_s"] / on["turn1_ttft_s"],
        "turn2_over_turn1_nocache": off["turn2_ttft_s"] / off["turn1_ttft_s"],
        # Each turn's prompt (image positions included): what turn 2 would prefill without the cache.
        "prompt_tokens": {f"turn{t['turn']}": t["prompt_tokens_p50"] for t in on["turns"]},
    }
    if image_cache_off is not None:
        summary["turn1_ttft_noimagecache_s"] = image_cache_off["turn1_ttft_s"]
        summary["turn2_ttft_noimagecache_s"] = image_cache_off["turn2_ttft_s"]
        summary["turn2_over_turn1_noimagecache"] = image_cache_off["turn2_ttft_s"] / image_cache_off["turn1_ttft_s"]
    # Where each turn's first token went on the server (medians by phase), where the runs read it.
    for chat, suffix in ((on, ""), (off, "_nocache"), (image_cache_off, "_noimagecache")):
        if chat is None:
            continue
        phases = {f"turn{t['turn']}": t["phases_p50_s"] for t in chat["turns"] if t.get("phases_p50_s")}
        if phases:
            summary[f"phases_p50_s{suffix}"] = phases
    # What each server's engine prefilled and its prefix cache held during the timed conversations, where recorded:
    # the evidence that the cache was on, and off.
    for chat, suffix in ((on, ""), (off, "_nocache")):
        if chat.get("engine_counters"):
            summary[f"engine_counters{suffix}"] = chat["engine_counters"]
    raw: dict[str, Any] = {"chat_on": on, "chat_off": off,
                           **({"chat_image_cache_off": image_cache_off} if image_cache_off is not None else {})}
    c64: dict[str, float] = {}
    for key, report, suffix in (("c64_on", c64_on, ""), ("c64_off", c64_off, "_nocache")):
        if report is None:
            continue
        runs = [r for r in report["runs"] if r["api"] == "stream" and r["concurrency"] == 64]
        if not runs:
            raise ValueError(f"{key}: no streamed run at concurrency 64")
        rates = [r["output_tok_s"] for r in runs]
        c64[suffix] = summary[f"served_c64_tok_s{suffix}"] = statistics.median_low(rates)  # one run's, not a mean
        summary[f"served_c64_tok_s{suffix}_runs"] = rates
        summary[f"ttft_c64_p50_s{suffix}"] = statistics.median_low(r["ttft_p50_s"] for r in runs)
        raw[key] = report
    if len(c64) == 2:
        summary["served_c64_cache_on_over_off"] = c64[""] / c64["_nocache"]
    summary["command"] = command
    summary["bench_commands"] = {key: report["command"] for key, report in raw.items()}
    summary["workload"] = on["workload"]
    if notes:
        summary["notes"] = notes
    summary["raw"] = raw
    return summary


def chat_line(summary: dict[str, Any]) -> str:
    """One line: the turns' TTFTs with and without the cache, and c64 where the summary has it."""
    line = (f"turn 1 {summary['turn1_ttft_s'] * 1e3:.1f} ms, turn 2 {summary['turn2_ttft_s'] * 1e3:.1f} ms "
            f"({summary['turn2_over_turn1']:.2f} of turn 1); cache off: turn 1 "
            f"{summary['turn1_ttft_nocache_s'] * 1e3:.1f} ms, turn 2 {summary['turn2_ttft_nocache_s'] * 1e3:.1f} ms "
            f"({summary['turn2_over_turn1_nocache']:.2f})")
    if "turn2_over_turn1_noimagecache" in summary:
        line += (f"; image cache off: turn 2 {summary['turn2_ttft_noimagecache_s'] * 1e3:.1f} ms "
                 f"({summary['turn2_over_turn1_noimagecache']:.2f})")
    for suffix, label in (("", "on"), ("_nocache", "off")):
        counters = summary.get(f"engine_counters{suffix}", {})
        if "prefix_cached_tokens" in counters:
            line += (f"; cache {label}: {counters['prefix_cache_hits']:.0f} hits, "
                     f"{counters['prefix_cached_tokens']:.0f} positions held, {counters['prefill_tokens']:.0f} prefilled")
    for suffix, label in (("", "on"), ("_nocache", "off")):
        if f"served_c64_tok_s{suffix}" in summary:
            runs = ", ".join(f"{r:.0f}" for r in summary[f"served_c64_tok_s{suffix}_runs"])
            line += f"; c64 cache {label} {summary[f'served_c64_tok_s{suffix}']:.0f} tok/s ({runs})"
    return line


def main(argv: list[str] | None = None) -> None:
    """The command line: RAW -> OUT, or ``chat ON OFF`` -> OUT."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:
        return _chat_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--decoder-params", type=float, required=True, help="language-model parameters")
    parser.add_argument("--command", required=True, help="the command that produced RAW")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", action="append", default=[], help="a remark kept in the file (repeatable)")
    args = parser.parse_args(argv)
    summary = summarize(json.loads(args.raw.read_text()), args.decoder_params, args.command, args.note)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


def _chat_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m triton_vlm.bench.summarize chat",
                                     description="the prefix cache's summary: chat runs with the cache on and off")
    parser.add_argument("on", type=Path, help="triton-vlm bench --chat-turns 2 --json, the cache on")
    parser.add_argument("off", type=Path, help="the same against a server with the cache off")
    parser.add_argument("--c64-on", type=Path, default=None, help="the standard stream bench at 64 clients, cache on")
    parser.add_argument("--c64-off", type=Path, default=None, help="the same, cache off")
    parser.add_argument("--image-cache-off", type=Path, default=None,
                        help="the chat run with the prefix cache on and the image cache off (image_cache_mb 0)")
    parser.add_argument("--command", required=True, help="the command that produced the runs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", action="append", default=[], help="a remark kept in the file (repeatable)")
    args = parser.parse_args(argv)

    def load(path: Path | None) -> Any:
        return None if path is None else json.loads(path.read_text())

    summary = summarize_chat(load(args.on), load(args.off), args.command, load(args.c64_on), load(args.c64_off),
                             args.note, load(args.image_cache_off))
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(chat_line(summary))


if __name__ == "__main__":
    main()
