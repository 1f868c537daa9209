"""The vLLM comparison's JSON (bench/vllm_compare.sh's runs merged by triton_vlm.bench.peer) and perf_analyzer's
inputs and report parsing."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from triton_vlm.bench import peer, perf_analyzer
from triton_vlm.bench.workload import Workload


def _served(b1: float, c64: float, ttft: float) -> dict[str, object]:
    runs = []
    for api, scale in (("stream", 1.0), ("infer", 1.02)):
        runs.append({"api": api, "concurrency": 1, "output_tok_s": b1 * scale, "ttft_p50_s": ttft})
        runs.append({"api": api, "concurrency": 64, "output_tok_s": c64 * scale, "ttft_p50_s": 0.5})
    return {"runs": runs, "gpu": "NVIDIA H100 80GB HBM3", "command": "triton-vlm bench ..."}


def _vllm(mode: str, b1: float, c64: float, ttft: float) -> str:
    line = json.dumps({"b1_tok_s": b1, "c64_tok_s": c64, "ttft_b1_s": ttft, "mode": mode,
                       "vllm_version": "0.26.0", "gpu": "NVIDIA H100 80GB HBM3"})
    return "INFO some log line\n" + line + "\n"  # run_vllm_llava.py's stdout: the JSON line comes last


def test_compare_has_the_issue_keys_and_ratios(tmp_path: Path) -> None:
    (tmp_path / "served.json").write_text(json.dumps(_served(170.0, 2900.0, 0.039), indent=2))
    (tmp_path / "served-fp8.json").write_text(json.dumps(_served(270.0, 4400.0, 0.037)))
    (tmp_path / "vllm-server.json").write_text(_vllm("server", 150.0, 2500.0, 0.050))
    (tmp_path / "vllm-server-fp8.json").write_text(_vllm("server", 200.0, 4000.0, 0.045))
    (tmp_path / "vllm-engine.json").write_text(_vllm("engine", 155.0, 2600.0, 0.045))
    (tmp_path / "pa.json").write_text(json.dumps({"runs": [{"concurrency": 1, "output_tok_s": 160.0},
                                                           {"concurrency": 64, "output_tok_s": 2900.0}]}))
    result = peer.compare(tmp_path, "bash bench/vllm_compare.sh ...")
    for suffix in ("", "_fp8"):
        for key in ("served_b1_tok_s", "served_c64_tok_s", "ttft_b1_s", "vllm_b1_tok_s", "vllm_c64_tok_s",
                    "vllm_ttft_b1_s"):
            assert key + suffix in result
    assert result["gpu"] == "NVIDIA H100 80GB HBM3" and result["vllm_version"] == "0.26.0"
    assert result["command"] == "bash bench/vllm_compare.sh ..."
    assert result["served_c64_tok_s"] == 2900.0 and result["served_infer_c64_tok_s"] == pytest.approx(2958.0)
    assert result["vllm_engine_c64_tok_s"] == 2600.0 and "vllm_engine_c64_tok_s_fp8" not in result
    assert result["perf_analyzer_c64_tok_s"] == 2900.0
    # perf_analyzer drives plain infer on the public model: it is checked against our infer rows.
    assert result["perf_analyzer_c64_agreement"] == pytest.approx(2900.0 / 2958.0)
    ratios = result["ratios_served_over_vllm_server"]
    assert ratios["b1"] == pytest.approx(170 / 150) and ratios["c64_fp8"] == pytest.approx(4400 / 4000)
    assert ratios["ttft_b1"] == pytest.approx(0.039 / 0.050)
    assert set(result["raw"]) == {"served_fp16", "served_fp8", "vllm_server_fp16", "vllm_server_fp8",
                                  "vllm_engine_fp16", "perf_analyzer_fp16"}
    table = peer.format_table(result)
    assert "| fp16 c64 tok/s | 2900.0 / 2958.0 | 2500.0 | 2600.0 | 2900.0 | 1.16x |" in table
    assert "| fp8 TTFT b1 ms | 37.0 | 45.0 | - | - | 0.82x |" in table


def test_compare_of_an_empty_directory_has_no_numbers(tmp_path: Path) -> None:
    result = peer.compare(tmp_path, "cmd")
    assert result == {"command": "cmd", "ratios_served_over_vllm_server": {}, "raw": {}}


def test_perf_analyzer_inputs_are_the_served_workload(tmp_path: Path) -> None:
    workload = Workload(model="llava", image_size=32, max_tokens=7)
    data = perf_analyzer.input_data(workload, 3)["data"]
    assert len(data) == 3
    images = [base64.b64decode(d["image"]["content"]["b64"]) for d in data]
    assert images == [workload.image(i) for i in range(3)] and len(set(images)) == 3  # distinct, as in the bench
    assert all(d["image"]["shape"] == [len(b)] for d, b in zip(data, images, strict=True))
    assert Image.open(io.BytesIO(images[0])).size == (32, 32)
    assert data[0]["prompt"] == [workload.prompt] and data[0]["max_tokens"] == [7]
    assert data[0]["ignore_eos"] == [True]


def test_perf_analyzer_report_is_read_in_seconds(tmp_path: Path) -> None:
    report = tmp_path / "r.csv"
    report.write_text("Concurrency,Inferences/Second,Client Send,p50 latency,p90 latency,p95 latency,p99 latency\n"
                      "64,22.5,10,2800000,2900000,2950000,3100000\n")
    assert perf_analyzer.parse_report(report) == (22.5, 2.8, 3.1)
    (tmp_path / "empty.csv").write_text("Concurrency,Inferences/Second\n")
    with pytest.raises(perf_analyzer.PerfAnalyzerError, match="no measurement"):
        perf_analyzer.parse_report(tmp_path / "empty.csv")


def test_library_links_take_the_plain_names(tmp_path: Path) -> None:
    libs = tmp_path / "nvidia_pytriton.libs"
    libs.mkdir()
    (libs / "libb64-98cb6333.so.0d").write_bytes(b"b64")
    (libs / "libcudart-09529672.so.12.6.77").write_bytes(b"cudart")
    links = perf_analyzer.library_dir(libs, tmp_path / "links")
    assert (links / "libb64.so.0d").read_bytes() == b"b64"
    assert (links / "libcudart.so.12").read_bytes() == b"cudart"
    (libs / "libb64-98cb6333.so.0d").unlink()
    with pytest.raises(perf_analyzer.PerfAnalyzerError, match="libb64"):
        perf_analyzer.library_dir(libs, tmp_path / "again")


def test_a_wheel_without_the_binary_says_which_wheel(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "tritonclient-2.73.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tritonclient/__init__.py", "")
    with pytest.raises(perf_analyzer.PerfAnalyzerError, match="2.51.0"):
        perf_analyzer.extract_binary(wheel, tmp_path / "bin")
