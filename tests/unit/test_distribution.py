"""The launcher on a server install laid out like NVIDIA's image (/opt/tritonserver), not only on the wheel."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import ROOT, free_port

from triton_vlm.launcher import ServerOptions, TritonServer
from triton_vlm.launcher.distribution import LauncherError, find_distribution, prepare_backend_dir

PY = (sys.version_info.major, sys.version_info.minor)


def server_install(root: Path, *, stub: bool = True, backend: bool = True) -> Path:
    """/opt/tritonserver of nvcr.io/nvidia/tritonserver:24.10-py3: bin/, lib/, backends/python/ with the
    stub inside, no python_backend_stubs/."""
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    python = root / "backends" / "python"
    python.mkdir(parents=True)
    (root / "backends" / "onnxruntime").mkdir()
    binary = root / "bin" / "tritonserver"
    # Records its arguments, then idles like a server until SIGTERM.
    binary.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n"
                      f"open(os.path.join(os.path.dirname(__file__), 'argv.json'), 'w').write(json.dumps(sys.argv))\n"
                      "time.sleep(60)\n")
    binary.chmod(0o755)
    (root / "lib" / "libtritonserver.so").write_bytes(b"")
    if backend:
        (python / "libtriton_python.so").write_bytes(b"")
    (python / "triton_python_backend_utils.py").write_text("")
    if stub:
        (python / "triton_python_backend_stub").write_bytes(b"")
    return root


def wheel_tree(root: Path, versions: list[str]) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tritonserver").write_bytes(b"")
    python = root / "backends" / "python"
    python.mkdir(parents=True)
    (python / "libtriton_python.so").write_bytes(b"")
    (python / "triton_python_backend_utils.py").write_text("")
    for version in versions:
        (root / "python_backend_stubs" / version).mkdir(parents=True)
        (root / "python_backend_stubs" / version / "triton_python_backend_stub").write_bytes(b"")
    return root


def test_server_install_uses_its_own_backends_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = server_install(tmp_path / "opt" / "tritonserver")
    monkeypatch.setenv("TRITON_VLM_TRITON_HOME", str(root))
    monkeypatch.delenv("TRITON_VLM_TRITON_LIBS", raising=False)
    dist = find_distribution()
    assert dist.binary == root / "bin" / "tritonserver"
    assert dist.libs == root / "lib"
    assert not dist.has_versioned_stubs
    backends = prepare_backend_dir(dist, tmp_path / "work")
    assert backends == root / "backends"
    assert (backends / "python" / "triton_python_backend_stub").is_file()
    assert not (tmp_path / "work").exists()  # nothing to lay out


def test_server_install_without_stub_or_backend(tmp_path: Path) -> None:
    from triton_vlm.launcher.distribution import TritonDistribution

    no_stub = server_install(tmp_path / "a", stub=False)
    with pytest.raises(LauncherError, match="no Python backend stub"):
        prepare_backend_dir(TritonDistribution(no_stub, None), tmp_path / "work")
    no_backend = server_install(tmp_path / "b", backend=False)
    with pytest.raises(LauncherError, match="has no Python backend"):
        prepare_backend_dir(TritonDistribution(no_backend, None), tmp_path / "work")


def test_wheel_layout_still_links_the_stub_for_this_python(tmp_path: Path) -> None:
    from triton_vlm.launcher.distribution import TritonDistribution

    root = wheel_tree(tmp_path / "tritonserver", ["3.10", f"{PY[0]}.{PY[1]}"])
    backends = prepare_backend_dir(TritonDistribution(root, None), tmp_path / "work")
    assert backends == tmp_path / "work" / "backends"
    stub = backends / "python" / "triton_python_backend_stub"
    assert stub.is_symlink() and stub.resolve() == root / "python_backend_stubs" / f"{PY[0]}.{PY[1]}" / stub.name
    assert (backends / "python" / "libtriton_python.so").is_symlink()


def test_wheel_layout_without_our_python_says_which_exist(tmp_path: Path) -> None:
    from triton_vlm.launcher.distribution import TritonDistribution

    root = wheel_tree(tmp_path / "tritonserver", ["3.8", "3.9"])
    # A stray stub beside the backend must not be taken for ours: the tree has per-version stubs.
    (root / "backends" / "python" / "triton_python_backend_stub").write_bytes(b"")
    with pytest.raises(LauncherError, match=r"available: 3\.8, 3\.9"):
        prepare_backend_dir(TritonDistribution(root, None), tmp_path / "work")


def test_triton_home_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_VLM_TRITON_HOME", str(tmp_path / "nope"))
    with pytest.raises(LauncherError, match="is not a directory"):
        find_distribution()


def test_server_runs_the_image_binary_with_the_image_backends(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """TritonServer over a server install: its tritonserver, its backends/, its lib/ on LD_LIBRARY_PATH."""
    root = server_install(tmp_path / "opt" / "tritonserver")
    monkeypatch.setenv("TRITON_VLM_TRITON_HOME", str(root))
    monkeypatch.delenv("TRITON_VLM_TRITON_LIBS", raising=False)
    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    http, grpc, metrics = sorted(ports)
    options = ServerOptions(models=("llava",), model_repository=ROOT / "triton_models", http_port=http,
                            grpc_port=grpc, metrics_port=metrics, instance_kind="cpu", work_dir=tmp_path / "run")
    server = TritonServer(options)
    server.start()
    try:
        argv_file = root / "bin" / "argv.json"
        deadline = time.monotonic() + 20
        while not argv_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        argv = json.loads(argv_file.read_text())
        env_libs = server._environment(find_distribution())["LD_LIBRARY_PATH"].split(":")
    finally:
        assert server.stop(timeout=10) is not None
    assert argv[0] == str(root / "bin" / "tritonserver")
    assert f"--backend-directory={root / 'backends'}" in argv
    assert f"--model-repository={tmp_path / 'run' / 'models'}" in argv
    assert env_libs[0] == str(root / "lib")
    assert "kind: KIND_CPU" in (tmp_path / "run" / "models" / "llava" / "config.pbtxt").read_text()
