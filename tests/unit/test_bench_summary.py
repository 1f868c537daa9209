"""triton_vlm.bench.summarize: the GPU issue's summary keys from a raw ``triton-vlm bench`` report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from triton_vlm.bench.summarize import summarize

ROOT = Path(__file__).resolve().parents[2]


def run(api: str, concurrency: int, tok_s: float, ttft: float) -> dict:
    return {"api": api, "concurrency": concurrency, "output_tok_s": tok_s, "ttft_p50_s": ttft}


def raw(apis: tuple[str, ...]) -> dict:
    return {"gpu": "H100", "command": "triton-vlm bench ...", "workload": {"model": "m"}, "ratios": {"x": 1.0},
            "runs": [run(api, c, 100.0 * c + (api == "infer"), 0.05 * c) for api in apis for c in (1, 64)],
            "baseline": [{"concurrency": 1, "output_tok_s": 10.0, "repeated_tok_s": 20.0, "kind": "hf_generate_static_batch"},
                         {"concurrency": 64, "output_tok_s": 500.0, "repeated_tok_s": 900.0,
                          "kind": "hf_generate_static_batch"}],
            "ratios_vs_repeated_baseline": {"y": 0.5}}


def test_streamed_runs_are_the_headline_and_plain_infer_rides_along() -> None:
    summary = summarize(raw(("stream", "infer")), decoder_params=1.5e9, command="bash run.sh", notes=["n"])
    assert (summary["served_b1_tok_s"], summary["served_c64_tok_s"]) == (100.0, 6400.0)
    assert (summary["served_infer_b1_tok_s"], summary["served_infer_c64_tok_s"]) == (101.0, 6401.0)
    assert (summary["hf_b1_tok_s"], summary["hf_c64_tok_s"]) == (10.0, 500.0)
    assert (summary["hf_b1_repeated_tok_s"], summary["hf_c64_repeated_tok_s"]) == (20.0, 900.0)
    assert summary["ratios_vs_repeated_baseline"] == {"y": 0.5}
    assert summary["ttft_b1_s"] == 0.05 and summary["ttft_is_whole_answer_latency"] is False
    assert summary["roofline_b1_tok_s"] == pytest.approx(3.0e12 / 3.0e9)
    assert summary["command"] == "bash run.sh" and summary["bench_command"] == "triton-vlm bench ..."
    assert summary["notes"] == ["n"] and summary["gpu"] == "H100"


def test_infer_only_reports_say_their_ttft_is_the_whole_answer() -> None:
    summary = summarize(raw(("infer",)), decoder_params=1e9, command="c")
    assert summary["served_api"] == "infer" and summary["ttft_is_whole_answer_latency"] is True
    assert "served_infer_b1_tok_s" not in summary and "notes" not in summary


@pytest.mark.parametrize("name", ["llava", "llava-fp8", "moondream2", "kosmos2"])
def test_committed_results_have_the_issue_keys(name: str) -> None:
    summary = json.loads((ROOT / "bench" / "results" / f"h100-{name}.json").read_text())
    for key in ("gpu", "served_b1_tok_s", "served_c64_tok_s", "hf_b1_tok_s", "hf_c64_tok_s", "ttft_b1_s",
                "roofline_b1_tok_s", "command", "bench_command"):
        assert key in summary, key
    assert summary["bench_command"] == summary["raw"]["command"] and "(runs:" not in summary["command"]
    assert summary["raw"]["workload"]["model"] == name.split("-")[0]
    assert ("FP8=1" in summary["command"]) == name.endswith("fp8")
