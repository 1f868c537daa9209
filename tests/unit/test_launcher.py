"""triton_vlm.launcher: repository rendering, options, ports, backend layout, the stub's Python."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as pb

from triton_vlm._protocol.model_config import load_model_config
from triton_vlm.config import ConfigError
from triton_vlm.launcher import LauncherError, ServerOptions, TritonServer, stub_env
from triton_vlm.launcher import server as server_module
from triton_vlm.launcher.distribution import TritonDistribution, find_distribution, library_path, prepare_backend_dir
from triton_vlm.launcher.repository import (
    base_model,
    companions,
    default_model_repository,
    list_models,
    make_forwarder,
    model_family,
    model_settings,
    render_repository,
    servable_models,
)

from .helpers import REPOSITORY, free_port


# -- repository ------------------------------------------------------------------------------------------------------
def test_list_and_servable_models() -> None:
    assert list_models(REPOSITORY) == ["kosmos2", "llava", "llava_next", "llava_onevision", "moondream2", "qwen2_vl",
                                       "smolvlm"]
    # Every family is served, each on the engine too: the <model>_stream engine models are no directories, they come
    # with their public model (test_engine_models_follow_the_family: a model of the auto family gets none).
    assert servable_models(REPOSITORY) == ["kosmos2", "llava", "llava_next", "llava_onevision", "moondream2", "qwen2_vl",
                                          "smolvlm"]
    assert model_family(REPOSITORY, "kosmos2") == "kosmos2"
    assert model_family(REPOSITORY, "smolvlm") == "smolvlm"
    assert model_family(REPOSITORY, "llava_stream") == "llava"
    assert companions(REPOSITORY, "llava") == ["llava_stream"]
    assert companions(REPOSITORY, "kosmos2") == ["kosmos2_stream"] and companions(REPOSITORY, "smolvlm") == ["smolvlm_stream"]
    assert companions(REPOSITORY, "moondream2") == ["moondream2_stream"]
    assert companions(REPOSITORY, "qwen2_vl") == ["qwen2_vl_stream"]
    assert companions(REPOSITORY, "llava_next") == ["llava_next_stream"]
    assert companions(REPOSITORY, "llava_onevision") == ["llava_onevision_stream"]
    assert companions(REPOSITORY, "llava_stream") == []
    assert base_model(REPOSITORY, "llava_stream") == "llava" and base_model(REPOSITORY, "llava") is None
    assert base_model(REPOSITORY, "gpt5_stream") is None


def write_model(repository: Path, name: str, parameters: dict[str, str]) -> None:
    (repository / name / "1").mkdir(parents=True)
    params = "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in parameters.items())
    (repository / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n{params}')
    (repository / name / "1" / "model.py").write_text("")


def test_engine_models_follow_the_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which public models get a <model>_stream is data of their family (ModelFamily.has_engine)."""
    write_model(tmp_path, "alpha", {"model_family": "llava"})
    write_model(tmp_path, "beta", {"model_family": "kosmos2"})
    write_model(tmp_path, "gamma", {"model_family": "auto"})
    assert [companions(tmp_path, m) for m in ("alpha", "beta", "gamma")] == [["alpha_stream"], ["beta_stream"], []]
    assert model_family(tmp_path, "alpha_stream") == "llava"
    assert servable_models(tmp_path) == ["alpha", "beta", "gamma"]
    from triton_vlm.models import get_family

    monkeypatch.setattr(type(get_family("kosmos2")), "has_engine", False)
    assert companions(tmp_path, "beta") == []
    # Only families this version can serve are selected by default.
    monkeypatch.setattr(type(get_family("kosmos2")), "supported", False)
    assert servable_models(tmp_path) == ["alpha", "gamma"]


def test_a_family_has_an_engine_where_it_names_an_adapter_the_engine_can_import() -> None:
    from triton_vlm.engine.adapter import EngineAdapter
    from triton_vlm.models import available_families, get_family

    engines = {name for name in available_families() if get_family(name).has_engine}
    assert engines == {"llava", "kosmos2", "moondream2", "qwen2_vl", "smolvlm", "llava_next", "llava_onevision"}
    for name in engines:
        assert isinstance(get_family(name).engine_adapter(), EngineAdapter), name
    assert get_family("auto").engine_adapter() is None


def test_a_stale_stream_directory_is_refused(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"model_family": "llava"})
    write_model(tmp_path, "alpha_stream", {"base_model": "alpha"})
    with pytest.raises(LauncherError, match="alpha_stream would hide the engine model the launcher derives from "
                                            "alpha; delete that directory"):
        list_models(tmp_path)


def test_engine_models_are_rendered_from_their_public_config(tmp_path: Path) -> None:
    target = render_repository(REPOSITORY, tmp_path / "models", ["moondream2", "moondream2_stream"], "KIND_CPU")
    assert sorted(p.name for p in target.iterdir()) == ["moondream2", "moondream2_stream"]
    config = load_model_config(target / "moondream2_stream" / "config.pbtxt")
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 64
    assert [g.kind for g in config.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    assert {k: v.string_value for k, v in config.parameters.items()} == {
        "model_family": "moondream2", "hf_model_id": "vikhyatk/moondream2", "revision": "2025-06-21",
        "base_model": "moondream2"}
    source = (target / "moondream2_stream" / "1" / "model.py").read_text()
    assert "class TritonPythonModel(TritonVLMStreamModel)" in source and 'family = "moondream2"' in source
    compile(source, "model.py", "exec")
    assert not (REPOSITORY / "moondream2_stream").exists()  # the source repository is untouched


def test_a_short_config_is_completed_and_gets_its_engine_model(tmp_path: Path) -> None:
    """What add-model writes (a few lines) is served as a complete model, with <name>_stream for an engine family."""
    from triton_vlm.launcher.scaffold import add_model

    add_model(tmp_path / "repo", "my-llava", "someone/llava-ft", family="llava")
    target = render_repository(tmp_path / "repo", tmp_path / "models", ["my-llava", "my-llava_stream"], None)
    public = load_model_config(target / "my-llava" / "config.pbtxt")
    assert [i.name for i in public.input][:2] == ["image", "prompt"] and public.max_batch_size == 8
    stream = load_model_config(target / "my-llava_stream" / "config.pbtxt")
    assert stream.parameters["hf_model_id"].string_value == "someone/llava-ft"
    assert "stream" in [i.name for i in stream.input]


def test_a_bad_parameter_fails_the_render(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"model_family": "llava", "max_num_seq": "4"})
    with pytest.raises(ConfigError, match="model 'alpha': unknown parameter 'max_num_seq' in its config.pbtxt; did "
                                          "you mean 'max_num_seqs'?"):
        render_repository(tmp_path, tmp_path / "models", ["alpha"], None)
    write_model(tmp_path, "beta", {"model_family": "llava", "max_num_seqs": "0"})
    # beta's own parameter, read for the engine model derived from it.
    with pytest.raises(ConfigError, match=r"model 'beta': max_num_seqs must be >= 1, got 0 \(from parameter"):
        render_repository(tmp_path, tmp_path / "models", ["beta_stream"], None)


def test_model_settings_are_what_the_stub_reads(tmp_path: Path) -> None:
    env = {"TRITON_VLM_LLAVA_DTYPE": "float16", "TRITON_VLM_LLAVA_STREAM_MAX_NUM_SEQS": "4"}
    stream = model_settings(REPOSITORY, "llava_stream", env)
    assert (stream.base_model, stream.weights.dtype, stream.engine.max_num_seqs) == ("llava", "float16", 4)
    assert model_settings(REPOSITORY, "llava", env).engine.max_num_seqs == 64
    assert model_settings(REPOSITORY, "smolvlm", {}).weights.hf_model_id == "HuggingFaceTB/SmolVLM-256M-Instruct"


def test_make_forwarder_turns_a_public_model_into_a_cpu_forwarder(tmp_path: Path) -> None:
    target = render_repository(REPOSITORY, tmp_path / "models", ["llava", "llava_stream"], "KIND_GPU")
    make_forwarder(target / "llava", "llava_stream", 6, "127.0.0.1:18001")
    config = load_model_config(target / "llava" / "config.pbtxt")
    assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == [
        (pb.ModelInstanceGroup.KIND_CPU, 6, [])]
    assert config.parameters["forward_to"].string_value == "llava_stream"
    assert config.parameters["forward_grpc_url"].string_value == "127.0.0.1:18001"  # this server's own gRPC
    # Everything else (inputs, outputs, batching, the weights parameters) is the public model's contract.
    original = load_model_config(REPOSITORY / "llava" / "config.pbtxt")
    del config.parameters["forward_to"]
    del config.parameters["forward_grpc_url"]
    config.ClearField("instance_group")
    original.ClearField("instance_group")
    assert config == original
    source = (target / "llava" / "1" / "model.py").read_text()
    assert "from triton_vlm.backend import ForwardingModel" in source
    assert "class TritonPythonModel(ForwardingModel)" in source and "llava_stream" in source
    compile(source, "model.py", "exec")
    # The engine model and the source repository are untouched.
    assert "TritonVLMStreamModel" in (target / "llava_stream" / "1" / "model.py").read_text()
    assert "ForwardingModel" not in (REPOSITORY / "llava" / "1" / "model.py").read_text()
    assert load_model_config(REPOSITORY / "llava" / "config.pbtxt").instance_group[0].kind == (
        pb.ModelInstanceGroup.KIND_GPU)


def test_forwarder_model_py_loads_without_torch(tmp_path: Path) -> None:
    """The forwarder's processes must stay light: its model.py imports the ForwardingModel, never torch."""
    import subprocess
    import textwrap

    target = render_repository(REPOSITORY, tmp_path / "models", ["kosmos2"], None)
    make_forwarder(target / "kosmos2", "kosmos2_stream", 2, "127.0.0.1:18001")
    script = textwrap.dedent(f"""
        import importlib.util, sys, types
        sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
        spec = importlib.util.spec_from_file_location("model", {str(target / "kosmos2" / "1" / "model.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        from triton_vlm.backend.proxy import ForwardingModel
        assert issubclass(module.TritonPythonModel, ForwardingModel)
        print("torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_model_family_defaults_to_model_name(tmp_path: Path) -> None:
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.pbtxt").write_text('name: "llava"\n')
    (tmp_path / "not-a-model").mkdir()
    assert list_models(tmp_path) == ["llava"]
    assert model_family(tmp_path, "llava") == "llava"


def test_render_repository_copies_selected_models_as_cpu(tmp_path: Path) -> None:
    target = render_repository(REPOSITORY, tmp_path / "models", ["llava"], "KIND_CPU")
    assert target == tmp_path / "models"
    assert sorted(p.name for p in target.iterdir()) == ["llava"]
    assert (target / "llava" / "1" / "model.py").read_text() == (REPOSITORY / "llava" / "1" / "model.py").read_text()
    assert not list(target.rglob("__pycache__"))
    config = load_model_config(target / "llava" / "config.pbtxt")
    assert [g.kind for g in config.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    original = load_model_config(REPOSITORY / "llava" / "config.pbtxt")
    assert original.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU  # the source is untouched
    config.ClearField("instance_group")
    original.ClearField("instance_group")
    assert config == original  # nothing else changed


def test_render_repository_without_kind_keeps_config(tmp_path: Path) -> None:
    target = render_repository(REPOSITORY, tmp_path / "models", ["kosmos2", "moondream2"], None)
    assert sorted(p.name for p in target.iterdir()) == ["kosmos2", "moondream2"]
    for model in ("kosmos2", "moondream2"):
        assert load_model_config(target / model / "config.pbtxt") == load_model_config(
            REPOSITORY / model / "config.pbtxt")


def test_render_repository_replaces_a_stale_target(tmp_path: Path) -> None:
    target = tmp_path / "models"
    (target / "old-model").mkdir(parents=True)
    (target / "stale.txt").write_text("x")
    render_repository(REPOSITORY, target, ["kosmos2"], "KIND_GPU")
    assert sorted(p.name for p in target.iterdir()) == ["kosmos2"]
    config = load_model_config(target / "kosmos2" / "config.pbtxt")
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU


def test_render_repository_unknown_model_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(LauncherError) as info:
        render_repository(REPOSITORY, tmp_path / "models", ["llava", "gpt5", "blip"], "KIND_CPU")
    message = str(info.value)
    assert "unknown model(s) gpt5, blip" in message
    assert message.endswith("has: kosmos2, llava, llava_next, llava_onevision, moondream2, qwen2_vl, smolvlm (and "
                            "<model>_stream for those whose family has an engine)")
    with pytest.raises(LauncherError, match="unknown model.s. llava_stream_stream;"):
        render_repository(REPOSITORY, tmp_path / "models", ["llava_stream_stream"], None)
    assert not (tmp_path / "models").exists()


def test_default_model_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_VLM_MODEL_REPOSITORY", str(tmp_path / "explicit"))
    assert default_model_repository() == tmp_path / "explicit"
    monkeypatch.delenv("TRITON_VLM_MODEL_REPOSITORY")
    (tmp_path / "project" / "triton_models").mkdir(parents=True)
    (tmp_path / "project" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "project" / "sub")
    assert default_model_repository() == tmp_path / "project" / "triton_models"
    monkeypatch.chdir(tmp_path)
    assert default_model_repository() == REPOSITORY  # the one beside the source tree


# -- options and ports ----------------------------------------------------------------------------------------------
def test_default_options() -> None:
    options = ServerOptions()
    assert (options.http_port, options.grpc_port, options.metrics_port, options.host) == (
        8000, 8001, 8002, "127.0.0.1")
    assert options.instance_kind == "auto" and options.models == ()


@pytest.mark.parametrize("ports", [(8000, 8000, 8002), (1, 2, 1), (5, 5, 5)])
def test_ports_must_differ(ports: tuple[int, int, int]) -> None:
    http, grpc, metrics = ports
    with pytest.raises(LauncherError, match="ports must differ"):
        ServerOptions(http_port=http, grpc_port=grpc, metrics_port=metrics)


@pytest.mark.parametrize("kind", ["GPU", "tpu", ""])
def test_bad_instance_kind(kind: str) -> None:
    with pytest.raises(LauncherError, match="instance kind must be auto, cpu or gpu"):
        ServerOptions(instance_kind=kind)


def test_port_in_use() -> None:
    port = free_port()
    assert server_module.port_in_use("127.0.0.1", port) is False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        assert server_module.port_in_use("127.0.0.1", port) is True
        assert server_module.port_in_use("localhost", port) is True
        sock.listen()
        assert server_module.port_in_use("0.0.0.0", port) is True
    assert server_module.port_in_use("127.0.0.1", port) is False


def test_start_refuses_a_busy_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ports = [free_port() for _ in range(3)]
    while len(set(ports)) < 3:
        ports = [free_port() for _ in range(3)]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[1]))
        sock.listen()
        server = TritonServer(ServerOptions(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                                            work_dir=tmp_path))
        with pytest.raises(LauncherError, match=f"gRPC port {ports[1]} is already in use.*--grpc-port"):
            server.start()
    assert server.process is None


def test_instance_kind_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def kind(option: str, gpu: bool) -> str | None:
        monkeypatch.setattr(server_module, "gpu_available", lambda: gpu)
        return TritonServer(ServerOptions(instance_kind=option, work_dir=tmp_path))._instance_kind()

    assert kind("cpu", True) == "KIND_CPU"
    assert kind("auto", False) == "KIND_CPU"
    assert kind("auto", True) is None  # as configured (GPU)
    assert kind("gpu", False) == "KIND_GPU"


def test_server_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "stub_python_bin", lambda work_dir: tmp_path / "stub-bin")
    server = TritonServer(ServerOptions(tiny=True, preload=True, work_dir=tmp_path,
                                        extra_env={"EXTRA": "1"}))
    server.models = ["llava", "kosmos2"]
    env = server._environment(find_distribution())
    assert env["PATH"].split(os.pathsep)[:2] == [str(tmp_path / "stub-bin"), str(Path(sys.executable).parent)]
    assert env["TRITON_VLM_TINY"] == "1"
    assert env["TRITON_VLM_LLAVA_PRELOAD"] == "1" and env["TRITON_VLM_KOSMOS2_PRELOAD"] == "1"
    assert env["EXTRA"] == "1"
    assert env["LD_LIBRARY_PATH"].startswith(str(find_distribution().libs))


def test_urls_for_wildcard_host(tmp_path: Path) -> None:
    server = TritonServer(ServerOptions(host="0.0.0.0", http_port=1, grpc_port=2, metrics_port=3,
                                        work_dir=tmp_path))
    assert (server.http_url, server.grpc_url, server.metrics_url) == (
        "127.0.0.1:1", "127.0.0.1:2", "http://127.0.0.1:3/metrics")


def test_stop_without_start_cleans_own_work_dir() -> None:
    server = TritonServer(ServerOptions())
    assert server.work_dir.is_dir()
    assert server.stop() is None
    assert not server.work_dir.exists()


def test_stop_keeps_a_given_work_dir(tmp_path: Path) -> None:
    TritonServer(ServerOptions(work_dir=tmp_path)).stop()
    assert tmp_path.is_dir()


def test_a_stop_that_takes_too_long_asks_the_stubs_for_their_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    monkeypatch.setattr(server_module, "STACKS_AFTER_S", 0.3)
    monkeypatch.setattr(server_module, "dump_stub_stacks", lambda pid: asked.append(pid) or [])
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    TritonServer._wait_stopping(quick, timeout=10)
    assert asked == []  # exited in time: nobody is asked
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    TritonServer._wait_stopping(slow, timeout=10)
    assert asked == [slow.pid] and slow.returncode == 0  # asked once, then waited for to the end
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            TritonServer._wait_stopping(stuck, timeout=0.6)
        assert asked == [slow.pid, stuck.pid]
    finally:
        stuck.kill()
        stuck.wait()


# -- distribution and backend directory ----------------------------------------------------------------------------
def test_find_distribution_in_the_pytriton_wheel() -> None:
    dist = find_distribution()
    assert dist.binary.is_file() and os.access(dist.binary, os.X_OK)
    assert dist.root.name == "tritonserver" and dist.root.parent.name == "pytriton"
    assert dist.libs is not None and dist.libs.is_dir()


def test_find_distribution_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_VLM_TRITON_HOME", str(tmp_path / "tree"))
    with pytest.raises(LauncherError, match=r"TRITON_VLM_TRITON_HOME=.*/tree is not a directory.*bin/tritonserver"):
        find_distribution()
    (tmp_path / "tree" / "bin").mkdir(parents=True)
    with pytest.raises(LauncherError, match="tritonserver binary missing at .*/tree/bin/tritonserver"):
        find_distribution()
    (tmp_path / "tree" / "bin" / "tritonserver").write_text("")
    (tmp_path / "nvidia_pytriton.libs").mkdir()
    dist = find_distribution()
    assert dist.root == tmp_path / "tree" and dist.libs == tmp_path / "nvidia_pytriton.libs"
    monkeypatch.setenv("TRITON_VLM_TRITON_LIBS", "/opt/libs")
    assert find_distribution().libs == Path("/opt/libs")


def test_prepare_backend_dir_links_library_and_stub(tmp_path: Path) -> None:
    dist = find_distribution()
    backends = prepare_backend_dir(dist, tmp_path)
    assert backends == tmp_path / "backends"
    python = backends / "python"
    library = python / "libtriton_python.so"
    stub = python / "triton_python_backend_stub"
    assert library.is_symlink() and library.resolve() == (dist.python_backend / "libtriton_python.so").resolve()
    assert stub.is_symlink()
    assert stub.resolve() == dist.stub_for(sys.version_info[:2]).resolve()
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in str(os.readlink(stub))
    assert not (python / "__pycache__").exists()
    # Running it again (a reused work dir) replaces the links instead of failing.
    assert prepare_backend_dir(dist, tmp_path) == backends
    assert stub.resolve() == dist.stub_for(sys.version_info[:2]).resolve()


def test_prepare_backend_dir_without_a_stub_for_this_python(tmp_path: Path) -> None:
    with pytest.raises(LauncherError) as info:
        prepare_backend_dir(find_distribution(), tmp_path, version=(2, 7))
    message = str(info.value)
    assert "no Triton Python backend stub for Python 2.7" in message
    assert "3.11" in message and "3.10" in message


def test_library_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/already/here")
    parts = library_path(TritonDistribution(tmp_path, tmp_path / "libs")).split(os.pathsep)
    assert parts[0] == str(tmp_path / "libs") and parts[-1] == "/already/here"
    monkeypatch.delenv("LD_LIBRARY_PATH")
    assert str(tmp_path) not in library_path(TritonDistribution(tmp_path, None))


# -- stub environment ---------------------------------------------------------------------------------------------
def test_numpy_major_reads_the_installed_numpy() -> None:
    import numpy

    assert stub_env.numpy_major() == int(numpy.__version__.split(".")[0])


def test_numpy_1_uses_this_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stub_env, "numpy_major", lambda: 1)
    assert stub_env.stub_python_bin(tmp_path) == Path(sys.executable).parent
    assert not (tmp_path / "stub-env").exists()


def test_numpy_2_without_a_numpy_1_wheel_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stub_env, "numpy_major", lambda: 2)
    monkeypatch.setenv("TRITON_VLM_NUMPY1_WHEEL", str(tmp_path / "numpy-1.26.4-cp311-cp311-nothere.whl"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # never reach a package index from a unit test
    with pytest.raises(LauncherError) as info:
        stub_env.stub_python_bin(tmp_path)
    message = str(info.value)
    assert "numpy 2 is installed" in message and "TRITON_VLM_NUMPY1_WHEEL" in message
    assert not (tmp_path / "stub-env" / ".numpy1-ready").exists()


def test_numpy_2_overlay_is_reused_once_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stub_env, "numpy_major", lambda: 2)
    (tmp_path / "stub-env").mkdir()
    (tmp_path / "stub-env" / ".numpy1-ready").write_text("numpy>=1.26,<2\n")
    monkeypatch.setattr(stub_env.subprocess, "run", lambda *a, **k: pytest.fail("must not rebuild"))
    assert stub_env.stub_python_bin(tmp_path) == tmp_path / "stub-env" / "bin"


def test_numpy1_wheelhouse_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheel = tmp_path / f"numpy-1.26.4-{tag}-{tag}-manylinux_2_17_x86_64.whl"
    wheel.write_bytes(b"")
    (tmp_path / f"numpy-2.1.0-{tag}-{tag}-manylinux_2_17_x86_64.whl").write_bytes(b"")
    monkeypatch.delenv("TRITON_VLM_NUMPY1_WHEEL", raising=False)
    monkeypatch.setenv("TRITON_VLM_WHEELHOUSE", str(tmp_path))
    assert stub_env._numpy1_wheels() == [str(wheel)]
    monkeypatch.setenv("TRITON_VLM_NUMPY1_WHEEL", "/x/numpy.whl")
    assert stub_env._numpy1_wheels() == ["/x/numpy.whl"]


@pytest.mark.parametrize("host_ml_dtypes, installed", [
    ("numpy>=2.0", ["numpy", "ml_dtypes"]),  # ml_dtypes 0.6, hidden from the stub: it gets a numpy 1 build
    ("numpy>=1.21", ["numpy"]),              # one that works with numpy 1 stays visible
])
def test_numpy_2_overlay_gets_numpy_1_builds_of_what_it_hides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              host_ml_dtypes: str, installed: list[str]) -> None:
    monkeypatch.setattr(stub_env, "numpy_major", lambda: 2)
    host, overlay_site = tmp_path / "host", tmp_path / "overlay-site"
    (host / "ml_dtypes-1.0.dist-info").mkdir(parents=True)
    (host / "ml_dtypes-1.0.dist-info" / "METADATA").write_text(f"Name: ml_dtypes\nRequires-Dist: {host_ml_dtypes}\n")
    overlay_site.mkdir()
    monkeypatch.setattr(stub_env.subprocess, "run", lambda *a, **k: None)  # python -m venv
    monkeypatch.setattr(stub_env.subprocess, "check_output", lambda *a, **k: str(overlay_site))
    monkeypatch.setattr(stub_env.site, "getsitepackages", lambda: [str(host)])
    monkeypatch.setattr(stub_env.site, "getusersitepackages", lambda: str(tmp_path / "no-user-site"))
    calls: list[str] = []
    monkeypatch.setattr(stub_env, "_install_numpy1", lambda site_dir, name="numpy": calls.append(name))
    stub_env.stub_python_bin(tmp_path / "work")
    assert calls == installed
    (view,) = (tmp_path / "work").rglob("host-site/0")  # the stub's view of the host: without what it hides
    assert ((view / "ml_dtypes-1.0.dist-info").exists()) == (installed == ["numpy"])


def test_numpy1_builds_come_from_the_wheelhouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheel = tmp_path / f"ml_dtypes-0.5.1-{tag}-{tag}-manylinux_2_17_x86_64.whl"
    wheel.write_bytes(b"")
    (tmp_path / f"ml_dtypes-0.6.0-{tag}-{tag}-manylinux_2_17_x86_64.whl").write_bytes(b"")  # needs numpy 2
    monkeypatch.setenv("TRITON_VLM_NUMPY1_WHEEL", "/x/numpy.whl")  # numpy's own; not ml_dtypes'
    monkeypatch.setenv("TRITON_VLM_WHEELHOUSE", str(tmp_path))
    assert stub_env._numpy1_wheels("ml_dtypes") == [str(wheel)]


def test_ready_waits_for_the_metrics_endpoint_too(tmp_path: Path) -> None:
    """Triton answers /v2/health/ready a moment before its metrics service listens: a scrape right after
    wait_until_ready was refused. Ready now means both answer."""
    import subprocess

    from .fake_triton import FakeTriton

    http, metrics = free_port(), free_port()
    options = ServerOptions(http_port=http, grpc_port=free_port(), metrics_port=metrics, work_dir=tmp_path)
    server = TritonServer(options)
    server.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a running "server"
    health = FakeTriton(http, routes={"/v2/health/ready": {}}).start()
    try:
        with pytest.raises(LauncherError, match="not ready after"):
            server.wait_until_ready(timeout=1)  # HTTP ready, metrics not listening yet
        scrape = FakeTriton(metrics, routes={"/metrics": "nv_inference_count 0"}).start(after=0.5)
        server.wait_until_ready(timeout=10)
        assert ("GET", "/metrics") in scrape.requests
        scrape.stop()
    finally:
        health.stop()
        server.process.kill()
        server.process.wait()


def test_the_numpy_1_view_hides_only_what_needs_numpy_2_on_this_python(tmp_path: Path) -> None:
    """Requirements count with their environment markers: ml_dtypes wants numpy >= 2.1 only on Python >= 3.13."""
    def dist(name: str, *requires: str) -> None:
        info = tmp_path / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires))
        (info / "top_level.txt").write_text(f"{name}\n")

    later = f"{sys.version_info.major}.{sys.version_info.minor + 1}"
    dist("ml_dtypes", "numpy>=1.21", f'numpy>=2.1.0; python_version >= "{later}"')
    dist("newlib", "numpy>=2.0")
    dist("oldlib", "numpy<2,>=1.20")
    dist("extras", 'numpy>=2; extra == "fast"', "requests")
    dist("plain", "requests")
    assert stub_env._requires_numpy2(tmp_path) == {"newlib"}
