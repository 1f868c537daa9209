"""triton_vlm.cli: the infer and make-tiny commands, exit codes and error output."""

from __future__ import annotations

from pathlib import Path

import pytest

from triton_vlm.cli.main import _parser, main
from triton_vlm.direct import direct_infer, direct_runtime
from triton_vlm.errors import UnknownModelError
from triton_vlm.runtime import VLMRuntime
from triton_vlm.tiny import tiny_checkpoint_dir

from .helpers import ROOT, SAMPLE_IMAGE, free_port


@pytest.fixture(autouse=True)
def in_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("family", ["llava", "kosmos2"])
def test_infer_direct_prints_exactly_the_generated_text(family: str, capsys: pytest.CaptureFixture[str],
                                                        request: pytest.FixtureRequest) -> None:
    runtime: VLMRuntime = request.getfixturevalue(f"{family}_runtime")
    expected = direct_infer(runtime, SAMPLE_IMAGE, "What is this?", max_tokens=5).text
    if family == "llava":
        assert expected  # the tiny llava says something for this prompt (kosmos2 may say only specials)
    code = main(["infer", "--direct", "--tiny", "--model", family, "--image", "test_images/sample_image.jpg",
                 "--prompt", "What is this?", "--max-tokens", "5"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.splitlines() == [expected]
    assert captured.out == expected + "\n"


def test_infer_direct_passes_sampling_flags(capsys: pytest.CaptureFixture[str], llava_runtime: VLMRuntime) -> None:
    expected = direct_infer(llava_runtime, SAMPLE_IMAGE, "Describe it.", max_tokens=6, temperature=1.3, top_p=0.9,
                            seed=77).text
    code = main(["infer", "--direct", "--tiny", "--model", "llava", "--image", str(SAMPLE_IMAGE),
                 "--prompt", "Describe it.", "--max-tokens", "6", "--temperature", "1.3", "--top-p", "0.9",
                 "--seed", "77"])
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"


def test_infer_bad_image_path_is_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["infer", "--direct", "--tiny", "--model", "llava", "--image", str(tmp_path / "nope.jpg"),
                 "--prompt", "What is this?"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.startswith("error: image: no such file")
    assert "nope.jpg" in captured.err


def test_infer_bad_request_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["infer", "--direct", "--tiny", "--model", "llava", "--image", str(SAMPLE_IMAGE),
                 "--prompt", "   "])
    assert code == 1
    assert capsys.readouterr().err.startswith("error: prompt: empty")


def test_infer_unknown_model_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["infer", "--direct", "--tiny", "--model", "nope", "--image", str(SAMPLE_IMAGE), "--prompt", "x"])
    assert code == 1
    assert "error: model 'nope' not found" in capsys.readouterr().err


def test_infer_against_closed_server_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"127.0.0.1:{free_port()}"
    code = main(["infer", "--model", "llava", "--image", str(SAMPLE_IMAGE), "--prompt", "hi", "--url", url])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.startswith(f"error: cannot reach triton-vlm server at {url}")


def test_direct_and_url_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["infer", "--direct", "--url", "h:1", "--model", "llava", "--image", "x", "--prompt", "y"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_url_default_follows_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_VLM_URL", raising=False)
    args = _parser().parse_args(["infer", "--model", "m", "--image", "i", "--prompt", "p"])
    assert args.url == "localhost:8000" and args.direct is False and args.max_tokens is None


def test_serve_arguments() -> None:
    args = _parser().parse_args(["serve", "--tiny", "--models", "llava", "--http-port", "9000",
                                 "--instance-kind", "cpu"])
    assert (args.tiny, args.models, args.http_port, args.grpc_port, args.instance_kind) == (
        True, "llava", 9000, 8001, "cpu")


def test_serve_with_equal_ports_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--http-port", "9000", "--grpc-port", "9000"])
    assert code == 1
    assert "ports must differ" in capsys.readouterr().err


def test_make_tiny_prints_checkpoint_paths(capsys: pytest.CaptureFixture[str], llava_runtime: VLMRuntime,
                                           kosmos2_runtime: VLMRuntime) -> None:
    assert main(["make-tiny"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(tiny_checkpoint_dir("llava")),
                                                    str(tiny_checkpoint_dir("kosmos2"))]


def test_make_tiny_into_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["make-tiny", "--families", "kosmos2", "--output", str(tmp_path)]) == 0
    path = tiny_checkpoint_dir("kosmos2", tmp_path)
    assert capsys.readouterr().out.splitlines() == [str(path)]
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_make_tiny_unknown_family_is_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["make-tiny", "--families", "blip", "--output", str(tmp_path)]) == 1
    assert "error: unknown model family 'blip'" in capsys.readouterr().err


def test_direct_runtime_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="model 'nope' not found in"):
        direct_runtime("nope", repository=tmp_path)


def test_direct_runtime_uses_config_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_VLM_KOSMOS2_MAX_TOKENS_LIMIT", "12")
    monkeypatch.setenv("TRITON_VLM_KOSMOS2_DEFAULT_MAX_TOKENS", "3")
    runtime = direct_runtime("kosmos2", tiny=True, device="cpu")
    assert runtime.settings.weights.tiny and runtime.settings.limits.max_tokens_limit == 12
    assert runtime.settings.weights.hf_model_id == "microsoft/kosmos-2-patch14-224"
    assert str(runtime.device) == "cpu" and runtime.loaded is None
    assert direct_runtime("kosmos2").device.type in ("cpu", "cuda")
