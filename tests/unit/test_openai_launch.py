"""How the OpenAI front is launched: CLI flags, the child process's command line and environment, the compose
``openai`` service."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from tests.unit.test_deploy_compose import FILES, interpolate, load, validate, variables

from triton_vlm.cli.main import _parser, _server_options, main
from triton_vlm.launcher import ServerOptions
from triton_vlm.launcher.compose import compose_environment, endpoints_text
from triton_vlm.launcher.distribution import LauncherError
from triton_vlm.openai import OpenAIOptions
from triton_vlm.openai.cli import options_from_args
from triton_vlm.openai.config import MiB
from triton_vlm.openai.process import front_command, front_environment


def test_serve_openai_flags_build_the_front_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TRITON_VLM_API_KEY", raising=False)
    monkeypatch.delenv("TRITON_VLM_API_KEY_FILE", raising=False)
    keys = tmp_path / "keys"
    keys.write_text("k-file\n")
    args = _parser().parse_args(["serve", "--grpc-port", "9101", "--openai-port", "9100", "--api-key", "k-flag",
                                 "--api-key-file", str(keys), "--cors-origin", "https://a.example",
                                 "--cors-origin", "https://b.example", "--allow-remote-images"])
    options = _server_options(args).openai
    assert options == OpenAIOptions(port=9100, host="127.0.0.1", triton_grpc_url="127.0.0.1:9101",
                                    api_keys=("k-flag", "k-file"),
                                    cors_origins=("https://a.example", "https://b.example"),
                                    allow_remote_images=True)
    wildcard = _server_options(_parser().parse_args(["start", "--host", "0.0.0.0", "--openai-port", "9100"]))
    assert wildcard.openai is not None and wildcard.openai.host == "0.0.0.0"
    assert wildcard.openai.triton_grpc_url == "127.0.0.1:8001" and wildcard.openai.api_keys == ()
    assert _server_options(_parser().parse_args(["serve"])).openai is None


def test_openai_port_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_VLM_OPENAI_PORT", "9555")
    monkeypatch.setenv("TRITON_VLM_API_KEY", "from-env")
    options = _server_options(_parser().parse_args(["serve"])).openai
    assert options is not None and options.port == 9555 and options.api_keys == ("from-env",)


def test_access_flags_without_openai_port_are_noted(capsys: pytest.CaptureFixture[str]) -> None:
    assert _server_options(_parser().parse_args(["serve", "--api-key", "k"])).openai is None
    assert "only with --openai-port" in capsys.readouterr().err


def test_openai_port_must_differ(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(LauncherError, match="OpenAI port 8001"):
        ServerOptions(openai=OpenAIOptions(port=8001))
    assert main(["serve", "--openai-port", "8000"]) == 1
    assert "OpenAI port 8000" in capsys.readouterr().err


def test_bad_key_file_is_a_plain_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--openai-port", "9100", "--api-key-file", str(tmp_path / "none")]) == 1
    assert "cannot read it" in capsys.readouterr().err


def test_standalone_front_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_VLM_API_KEY", raising=False)
    monkeypatch.setenv("TRITON_VLM_OPENAI_CORS_ORIGINS", "https://x.example, https://y.example")
    args = _parser().parse_args(["openai", "--triton-grpc", "triton:8001", "--port", "9000", "--max-body-mb", "1.5",
                                 "--max-image-mb", "1", "--max-concurrent-requests", "3",
                                 "--max-concurrent-per-key", "2"])
    options = options_from_args(args)
    assert options.triton_grpc_url == "triton:8001" and options.port == 9000
    assert options.max_body_bytes == int(1.5 * MiB) and options.max_image_bytes == MiB
    assert options.cors_origins == ("https://x.example", "https://y.example")
    assert options.max_concurrent_per_key == 2
    assert options.max_concurrent_requests == 3 and not options.allow_remote_images


def test_the_child_gets_keys_by_environment_never_by_command_line() -> None:
    options = OpenAIOptions(port=9100, host="0.0.0.0", triton_grpc_url="127.0.0.1:8001",
                            api_keys=("sk-first-9f3a", "sk-second-77c1"), cors_origins=("*",),
                            allow_remote_images=True, max_body_bytes=3 * MiB // 2,
                            request_timeout_s=30)
    command = front_command(options)
    assert command[:3] == [sys.executable, "-m", "triton_vlm.openai"]
    # Keys no path holds: the interpreter's own path (a checkout in /tmp/fresh-s11, say) may contain "s1".
    assert not any("sk-first" in part or "sk-second" in part for part in command)
    env = front_environment(options, base={"TRITON_VLM_API_KEY_FILE": "/keys", "TRITON_VLM_OPENAI_CORS_ORIGINS": "z",
                                           "TRITON_VLM_OPENAI_ALLOW_PRIVATE_IMAGE_HOSTS": "1", "PATH": "/bin"})
    assert env["TRITON_VLM_API_KEY"] == "sk-first-9f3a,sk-second-77c1" and "TRITON_VLM_API_KEY_FILE" not in env
    assert not any(name.startswith("TRITON_VLM_OPENAI_") for name in env) and env["PATH"] == "/bin"
    assert "TRITON_VLM_API_KEY" not in front_environment(OpenAIOptions(), base={"TRITON_VLM_API_KEY": "old"})
    # What the child parses is what the launcher meant.
    args = _parser().parse_args(["openai", *command[3:]])
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        assert options_from_args(args) == options
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_launcher_keeps_keys_from_tritonserver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from triton_vlm.launcher import TritonServer
    from triton_vlm.launcher.distribution import find_distribution

    monkeypatch.setenv("TRITON_VLM_API_KEY", "secret")
    server = TritonServer(ServerOptions(openai=OpenAIOptions(port=9100, api_keys=("secret",))))
    try:
        assert "TRITON_VLM_API_KEY" not in server._environment(find_distribution())
    finally:
        server.stop()


# -- compose ----------------------------------------------------------------------------------------------------
def _openai_options() -> ServerOptions:
    return ServerOptions(host="0.0.0.0", openai=OpenAIOptions(port=9300, api_keys=("k1", "k2"),
                                                              cors_origins=("https://ui.example",)))


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_compose_openai_service(mode: str) -> None:
    document = load(mode)
    service = document["services"]["openai"]
    assert service["profiles"] == ["openai"]  # off unless asked for
    assert service["image"] == document["services"]["triton"]["image"]
    assert service["command"] == ["triton-vlm", "openai", "--host", "0.0.0.0", "--port", "9000", "--triton-grpc",
                                  "triton:8001"]
    assert service["depends_on"] == ["triton"]
    assert "/health/ready" in service["healthcheck"]["test"][-1]
    env = compose_environment(_openai_options(), base={})
    assert env["COMPOSE_PROFILES"] == "openai"
    rendered = interpolate(document, env)
    assert validate(rendered) == []
    service = rendered["services"]["openai"]
    assert service["ports"] == ["0.0.0.0:9300:9000"]
    assert service["environment"]["TRITON_VLM_API_KEY"] == "k1,k2"
    assert service["environment"]["TRITON_VLM_OPENAI_CORS_ORIGINS"] == "https://ui.example"
    assert service["environment"]["TRITON_VLM_OPENAI_ALLOW_REMOTE_IMAGES"] == "0"
    assert "TRITON_VLM_API_KEY" not in rendered["services"]["triton"]["environment"]
    defaults = interpolate(document, {})["services"]["openai"]
    assert defaults["ports"] == ["127.0.0.1:9000:9000"] and defaults["environment"]["TRITON_VLM_API_KEY"] == ""
    used = set(variables(FILES[mode].read_text()))
    assert set(env) - {"COMPOSE_PROFILES"} <= used


def test_compose_profiles_are_kept_and_endpoints_name_the_api() -> None:
    env = compose_environment(_openai_options(), base={"COMPOSE_PROFILES": "debug"})
    assert env["COMPOSE_PROFILES"] == "debug,openai"
    assert "COMPOSE_PROFILES" not in compose_environment(ServerOptions(), base={})
    assert "OpenAI   http://127.0.0.1:9300/v1" in endpoints_text(_openai_options(), "docker")
    assert "OpenAI" not in endpoints_text(ServerOptions(), "docker")


def test_the_server_stops_waiting_when_the_front_dies(tmp_path: Path) -> None:
    import subprocess

    from triton_vlm.launcher import TritonServer
    from triton_vlm.openai.process import OpenAIFront

    server = TritonServer(ServerOptions(work_dir=tmp_path))
    server.process = subprocess.Popen(["sleep", "30"])
    server.openai_front = OpenAIFront(OpenAIOptions())
    server.openai_front.process = subprocess.Popen(["sh", "-c", "exit 3"])
    try:
        assert server.wait(poll_s=0.05) == 1
    finally:
        server.process.kill()
        server.process.wait()
    server.process = subprocess.Popen(["sh", "-c", "exit 7"])
    server.openai_front = None
    assert server.wait(poll_s=0.05) == 7
