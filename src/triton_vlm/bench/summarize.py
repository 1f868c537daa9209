"""The summary file the GPU issue asks for, from a raw ``triton-vlm bench --json`` report.

python -m triton_vlm.bench.summarize RAW.json --decoder-params 6.74e9 \
    --command "MODEL=llava bash bench/gpu_triton_run.sh" --out bench/results/h100-llava.json

``roofline_b1_tok_s`` is memory bandwidth (3.0 TB/s, a practical H100 figure) over the bytes one decode step
reads at batch 1: the language model's weights (fp16/bf16: 2 bytes a parameter).
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    """The command line: RAW -> OUT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--decoder-params", type=float, required=True, help="language-model parameters")
    parser.add_argument("--command", required=True, help="the command that produced RAW")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", action="append", default=[], help="a remark kept in the file (repeatable)")
    args = parser.parse_args()
    summary = summarize(json.loads(args.raw.read_text()), args.decoder_params, args.command, args.note)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
