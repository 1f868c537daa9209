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


# -- the prefix cache's summary (``summarize chat``) ---------------------------------------------------------------
def chat_report(turn1: float, turn2: float, max_tokens: int = 64, counters: dict | None = None) -> dict:
    return {"command": "triton-vlm bench --chat-turns 2", "gpu": "H100", "engine_counters": counters or {},
            "workload": {"model": "llava", "max_tokens": max_tokens, "conversations": 8, "turns": 2},
            "turn1_ttft_s": turn1, "turn2_ttft_s": turn2,
            "turns": [{"turn": 1, "prompt_tokens_p50": 600.0}, {"turn": 2, "prompt_tokens_p50": 700.0}]}


def c64_report(*rates: float) -> dict:
    return {"command": "triton-vlm bench --concurrency 64,64,64",
            "runs": [run("stream", 64, rate, rate / 1e5) for rate in rates] + [run("infer", 64, 1.0, 1.0)]}


def test_chat_summary_has_the_issue_keys_from_the_runs_with_the_cache_on_and_off() -> None:
    from triton_vlm.bench.summarize import chat_line, summarize_chat

    on_counters = {"prefill_tokens": 5800.0, "prefix_cache_hits": 8.0, "prefix_cache_misses": 8.0,
                   "prefix_cached_tokens": 4992.0}
    off_counters = {"prefill_tokens": 10800.0}  # a server without the cache exports no prefix-cache counters
    summary = summarize_chat(chat_report(0.040, 0.010, counters=on_counters),
                             chat_report(0.041, 0.045, counters=off_counters), "bash bench/gpu_chat_run.sh",
                             c64_report(2900.0, 2800.0, 3000.0), c64_report(2950.0, 2850.0, 2700.0), ["n"])
    assert (summary["engine_counters"], summary["engine_counters_nocache"]) == (on_counters, off_counters)
    assert (summary["turn1_ttft_s"], summary["turn2_ttft_s"], summary["turn2_ttft_nocache_s"]) == (0.040, 0.010, 0.045)
    assert summary["turn1_ttft_nocache_s"] == 0.041
    assert summary["turn2_over_turn1"] == pytest.approx(0.25)
    assert summary["turn2_over_turn1_nocache"] == pytest.approx(0.045 / 0.041)
    assert summary["prompt_tokens"] == {"turn1": 600.0, "turn2": 700.0}
    # Medians over the repeated c64 runs (streamed ones only), each run kept for the spread.
    assert (summary["served_c64_tok_s"], summary["served_c64_tok_s_nocache"]) == (2900.0, 2850.0)
    assert summary["served_c64_tok_s_runs"] == [2900.0, 2800.0, 3000.0]
    assert summary["ttft_c64_p50_s_nocache"] == pytest.approx(0.0285)
    assert summary["served_c64_cache_on_over_off"] == pytest.approx(2900.0 / 2850.0)
    assert set(summary["raw"]) == {"chat_on", "chat_off", "c64_on", "c64_off"}
    assert summary["bench_commands"]["c64_off"] == "triton-vlm bench --concurrency 64,64,64"
    assert summary["gpu"] == "H100" and summary["notes"] == ["n"] and summary["command"] == "bash bench/gpu_chat_run.sh"
    line = chat_line(summary)
    assert "turn 2 10.0 ms (0.25 of turn 1)" in line and "c64 cache off 2850 tok/s (2950, 2850, 2700)" in line
    assert "cache on: 8 hits, 4992 positions held, 5800 prefilled" in line and "cache off:" in line


def test_chat_summary_keeps_where_each_turns_first_token_went_on_the_server() -> None:
    from triton_vlm.bench.summarize import chat_line, summarize_chat

    on, off = chat_report(0.040, 0.030), chat_report(0.041, 0.045)
    on["turns"][0]["phases_p50_s"] = {"prepare": 0.006, "prefill": 0.020}
    on["turns"][1]["phases_p50_s"] = {"prepare": 0.006, "prefill": 0.012}
    summary = summarize_chat(on, off, "bash bench/gpu_chat_run.sh")
    assert summary["phases_p50_s"] == {"turn1": {"prepare": 0.006, "prefill": 0.020},
                                       "turn2": {"prepare": 0.006, "prefill": 0.012}}
    assert "phases_p50_s_nocache" not in summary  # a run that could not read the server's metrics
    third = chat_report(0.042, 0.021)
    third["turns"][1]["phases_p50_s"] = {"prepare": 0.009, "prefill": 0.012}
    summary = summarize_chat(on, off, "bash bench/cpu_chat_run.sh", image_cache_off=third)
    assert summary["turn2_over_turn1_noimagecache"] == pytest.approx(0.5)
    assert summary["turn2_ttft_noimagecache_s"] == 0.021
    assert summary["phases_p50_s_noimagecache"] == {"turn2": {"prepare": 0.009, "prefill": 0.012}}
    assert summary["raw"]["chat_image_cache_off"] is third
    assert "image cache off: turn 2 21.0 ms (0.50)" in chat_line(summary)


def test_chat_summary_without_c64_runs_and_with_mismatched_workloads() -> None:
    from triton_vlm.bench.summarize import chat_line, summarize_chat

    summary = summarize_chat(chat_report(0.040, 0.010), chat_report(0.040, 0.040), "c")
    assert "served_c64_tok_s" not in summary and "served_c64_cache_on_over_off" not in summary
    assert "engine_counters" not in summary and "hits" not in chat_line(summary)
    assert "c64" not in chat_line(summary)
    with pytest.raises(ValueError, match="workloads differ"):
        summarize_chat(chat_report(0.040, 0.010), chat_report(0.040, 0.040, max_tokens=32), "c")
    with pytest.raises(ValueError, match="c64_on: no streamed run"):
        summarize_chat(chat_report(0.040, 0.010), chat_report(0.040, 0.040), "c", c64_on={"runs": []})


def test_summarize_chat_command_line_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from triton_vlm.bench.summarize import main

    for name, report in (("on", chat_report(0.04, 0.01)), ("off", chat_report(0.04, 0.04)),
                         ("c64-on", c64_report(2900.0)), ("c64-off", c64_report(2800.0))):
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    out = tmp_path / "h100-llava-chat.json"
    main(["chat", str(tmp_path / "on.json"), str(tmp_path / "off.json"), "--c64-on", str(tmp_path / "c64-on.json"),
          "--c64-off", str(tmp_path / "c64-off.json"), "--command", "bash bench/gpu_chat_run.sh", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert (summary["turn2_ttft_s"], summary["turn2_ttft_nocache_s"], summary["served_c64_tok_s_nocache"]) == (
        0.01, 0.04, 2800.0)
    assert "turn 2 10.0 ms (0.25 of turn 1)" in capsys.readouterr().out
