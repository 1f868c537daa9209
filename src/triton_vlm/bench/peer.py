"""The same-window comparison with vLLM: one JSON from the runs ``bench/vllm_compare.sh`` leaves in a directory.

Inputs (one window, one card): ``served[-fp8].json`` (``triton-vlm bench --json`` against our server),
``pa[-fp8].json`` (:mod:`triton_vlm.bench.perf_analyzer` against the same server), ``vllm-server[-fp8].json`` and
``vllm-engine[-fp8].json`` (``shared/peer/run_vllm_llava.py``, one JSON line each).

    python -m triton_vlm.bench.peer DIR --command "..." --out bench/results/h100-llava-vs-vllm.json

``served_*`` is our streamed path through Triton (gRPC streaming to ``llava_stream``), ``vllm_*`` vLLM's OpenAI
server with streaming clients: both are what a user's client sees. vLLM's in-process engine is kept beside it as
``vllm_engine_*``. b1 tok/s: ours is the tokens of sequential requests over their wall time, vLLM's the median of
per-request tokens over latency; both include the time to the first token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: One precision's files, by the suffix their keys take.
PRECISIONS = {"": "fp16", "_fp8": "fp8"}


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # run_vllm_llava.py's stdout: logs, then one JSON line
        return json.loads(text.strip().splitlines()[-1])


def _served_run(report: dict[str, Any], api: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in report["runs"] if r["api"] == api and r["concurrency"] == concurrency), None)


def _pa_run(report: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    return next((r for r in report["runs"] if r["concurrency"] == concurrency), None)


def compare(directory: Path, command: str, notes: list[str] | None = None) -> dict[str, Any]:
    """The comparison's keys for every precision whose files are in ``directory``."""
    out: dict[str, Any] = {"command": command}
    if notes:
        out["notes"] = notes
    raw: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    for suffix, precision in PRECISIONS.items():
        served = _load(directory / f"served{suffix.replace('_', '-')}.json")
        server = _load(directory / f"vllm-server{suffix.replace('_', '-')}.json")
        engine = _load(directory / f"vllm-engine{suffix.replace('_', '-')}.json")
        pa = _load(directory / f"pa{suffix.replace('_', '-')}.json")
        if served is not None:
            raw[f"served_{precision}"] = served
            out.setdefault("gpu", served.get("gpu"))
            b1, c64 = _served_run(served, "stream", 1), _served_run(served, "stream", 64)
            if b1 and c64:
                out[f"served_b1_tok_s{suffix}"] = b1["output_tok_s"]
                out[f"served_c64_tok_s{suffix}"] = c64["output_tok_s"]
                out[f"ttft_b1_s{suffix}"] = b1["ttft_p50_s"]
            infer_b1, infer_c64 = _served_run(served, "infer", 1), _served_run(served, "infer", 64)
            if infer_b1 and infer_c64:
                out[f"served_infer_b1_tok_s{suffix}"] = infer_b1["output_tok_s"]
                out[f"served_infer_c64_tok_s{suffix}"] = infer_c64["output_tok_s"]
        # vLLM's server is the fair peer (``vllm_*``); its in-process engine is kept beside it (``vllm_engine_*``).
        for mode, run, prefix in (("server", server, "vllm_"), ("engine", engine, "vllm_engine_")):
            if run is None:
                continue
            raw[f"vllm_{mode}_{precision}"] = run
            for key in ("b1_tok_s", "c64_tok_s", "ttft_b1_s"):
                out[f"{prefix}{key}{suffix}"] = run[key]
            out.setdefault("vllm_version", run.get("vllm_version"))
            out.setdefault("gpu", run.get("gpu"))
        if pa is not None:
            raw[f"perf_analyzer_{precision}"] = pa
            for level in (1, 64):
                run = _pa_run(pa, level)
                if run:
                    out[f"perf_analyzer_c{level}_tok_s{suffix}"] = run["output_tok_s"]
            infer_c64 = out.get(f"served_infer_c64_tok_s{suffix}")
            if infer_c64 and f"perf_analyzer_c64_tok_s{suffix}" in out:
                # perf_analyzer drives plain infer on the public model: the same path as our "infer" rows.
                out[f"perf_analyzer_c64_agreement{suffix}"] = out[f"perf_analyzer_c64_tok_s{suffix}"] / infer_c64
        for key in ("b1_tok_s", "c64_tok_s"):
            ours, theirs = out.get(f"served_{key}{suffix}"), out.get(f"vllm_{key}{suffix}")
            if ours and theirs:
                ratios[f"{key.removesuffix('_tok_s')}{suffix}"] = ours / theirs
        ours_ttft, theirs_ttft = out.get(f"ttft_b1_s{suffix}"), out.get(f"vllm_ttft_b1_s{suffix}")
        if ours_ttft and theirs_ttft:
            ratios[f"ttft_b1{suffix}"] = ours_ttft / theirs_ttft
    out["ratios_served_over_vllm_server"] = ratios
    out["raw"] = raw
    return out


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of the comparison."""
    lines = ["| llava-1.5-7b | triton-vlm (stream / infer) | vLLM server | vLLM engine | perf_analyzer | ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    for suffix, precision in PRECISIONS.items():
        for level in ("b1", "c64"):
            ours = result.get(f"served_{level}_tok_s{suffix}")
            if ours is None and result.get(f"vllm_{level}_tok_s{suffix}") is None:
                continue
            infer = result.get(f"served_infer_{level}_tok_s{suffix}")
            ratio = result["ratios_served_over_vllm_server"].get(f"{level}{suffix}")
            lines.append(
                f"| {precision} {level} tok/s | {_num(ours)} / {_num(infer)} | {_num(result.get(f'vllm_{level}_tok_s{suffix}'))} "
                f"| {_num(result.get(f'vllm_engine_{level}_tok_s{suffix}'))} "
                f"| {_num(result.get(f'perf_analyzer_c{level[1:]}_tok_s{suffix}'))} | {_ratio(ratio)} |")
        if result.get(f"ttft_b1_s{suffix}") is not None or result.get(f"vllm_ttft_b1_s{suffix}") is not None:
            ratio = result["ratios_served_over_vllm_server"].get(f"ttft_b1{suffix}")
            lines.append(f"| {precision} TTFT b1 ms | {_ms(result.get(f'ttft_b1_s{suffix}'))} "
                         f"| {_ms(result.get(f'vllm_ttft_b1_s{suffix}'))} "
                         f"| {_ms(result.get(f'vllm_engine_ttft_b1_s{suffix}'))} | - | {_ratio(ratio)} |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--command", required=True, help="how the runs were made")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", action="append", default=[], help="a note to keep in the JSON (repeatable)")
    args = parser.parse_args(argv)
    result = compare(args.directory, args.command, args.note)
    print(format_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
