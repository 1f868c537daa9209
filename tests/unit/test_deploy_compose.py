"""docker-compose.yml and docker-compose-cpu.yml against the Compose Specification's JSON schema (vendored in
tests/data/schemas), before and after variable interpolation, plus what the start script relies on."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema
import pytest
import yaml
from tests.conftest import ROOT

from triton_vlm.launcher import ServerOptions
from triton_vlm.launcher.compose import COMPOSE_FILES, compose_environment

SCHEMA = json.loads((ROOT / "tests" / "data" / "schemas" / "compose-spec.json").read_text())
FILES = {mode: ROOT / name for mode, name in COMPOSE_FILES.items()}
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a literal $.
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation (the subset the files use), applied to every string of the document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        if op in (":-", "-"):
            use_default = current is None or (op == ":-" and current == "")
            return arg if use_default else current  # type: ignore[return-value]
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise KeyError(f"{name}: {arg}")
        if current is None:
            raise KeyError(f"{name} is unset and has no default")
        return current

    return VARIABLE.sub(replace, value.replace("$$", "\0")).replace("\0", "$")


def variables(text: str) -> dict[str, str | None]:
    return {m.group("name"): m.group("op") for m in VARIABLE.finditer(text)}


def validate(document: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def load(mode: str) -> dict[str, Any]:
    return yaml.safe_load(FILES[mode].read_text())


def test_vendored_schema_is_the_compose_spec() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["title"] == "Compose Specification"
    assert {"services", "volumes", "networks"} <= set(SCHEMA["properties"])


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_compose_file_matches_the_schema(mode: str) -> None:
    document = load(mode)
    assert validate(document) == []
    # As `docker compose up` sees it: with no variables set, and with what the start script sets.
    assert validate(interpolate(document, {})) == []
    options = ServerOptions(models=("llava", "kosmos2"), http_port=18000, grpc_port=18001, metrics_port=18002,
                            host="0.0.0.0", tiny=True, preload=True)
    assert validate(interpolate(document, compose_environment(options, base={}))) == []


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_every_variable_has_a_default(mode: str) -> None:
    """`docker compose up` works with an empty environment: no variable may be required."""
    for name, op in variables(FILES[mode].read_text()).items():
        assert op in (":-", "-"), f"${{{name}}} in {FILES[mode].name} has no default"


def test_start_script_variables_reach_the_compose_files() -> None:
    options = ServerOptions(models=("llava",), tiny=True, preload=True)
    passed = set(compose_environment(options, base={}))
    for mode in FILES:
        used = set(variables(FILES[mode].read_text()))
        assert passed <= used, f"{FILES[mode].name} ignores {sorted(passed - used)}"


def test_the_schema_catches_mistakes() -> None:
    """The validation is not vacuous: typical slips fail it."""
    broken = copy.deepcopy(load("gpu"))
    broken["services"]["triton"]["shm_sise"] = "2gb"
    assert any("shm_sise" in error for error in validate(broken))
    broken = copy.deepcopy(load("gpu"))
    del broken["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]
    assert any("capabilities" in error for error in validate(broken))
    broken = copy.deepcopy(load("gpu"))
    broken["services"]["triton"]["healthcheck"]["interval"] = 15
    assert any("interval" in error for error in validate(broken))


def _service(mode: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(load(mode), env or {})["services"]["triton"]


@pytest.mark.parametrize("mode, kind, dockerfile", [("gpu", "gpu", "Dockerfile"), ("cpu", "cpu", "Dockerfile.cpu")])
def test_service_runs_the_launcher_inside_the_image(mode: str, kind: str, dockerfile: str) -> None:
    service = _service(mode)
    assert service["build"]["context"] == "." and service["build"]["dockerfile"] == dockerfile
    assert (ROOT / service["build"]["dockerfile"]).is_file()
    assert service["command"] == ["triton-vlm", "serve", "--host", "0.0.0.0", "--instance-kind", kind]


def test_gpu_reservation_only_in_the_gpu_file() -> None:
    (device,) = _service("gpu")["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert "deploy" not in _service("cpu")
    assert "nvidia" not in FILES["cpu"].read_text().replace("NVIDIA's", "").replace("nvidia-pytriton", "")
    assert _service("cpu")["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_cpu_build_takes_a_local_base_torch_wheels_and_a_ca_secret() -> None:
    """What `make docker-test` sets: a base image made with debootstrap, no torch index (the local wheel), pip's
    CA bundle as a build secret (never a build argument: those stay in the image's history)."""
    build = _service("cpu")["build"]
    assert build["args"]["BASE_IMAGE"] == "debian:bookworm-slim" and build["secrets"] == ["pip_cert"]
    assert "PIP_CERT" not in json.dumps(build["args"]) and "cert" not in " ".join(build["args"]).lower()
    assert interpolate(load("cpu"), {})["secrets"]["pip_cert"]["file"] == "/dev/null"
    env = {"TRITON_VLM_BASE_IMAGE": "triton-vlm-base:bookworm", "TRITON_VLM_TORCH_INDEX_URL": "",
           "TRITON_VLM_PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"}
    document = interpolate(load("cpu"), env)
    assert document["services"]["triton"]["build"]["args"] == {"BASE_IMAGE": "triton-vlm-base:bookworm",
                                                               "TORCH_INDEX_URL": ""}
    assert document["secrets"]["pip_cert"]["file"] == "/etc/ssl/certs/ca-certificates.crt"
    assert validate(document) == []


def test_cpu_service_sets_no_memlock_limit() -> None:
    """Raising RLIMIT_MEMLOCK needs a privilege sandboxed engines lack: the container would not start."""
    assert "memlock" not in _service("cpu")["ulimits"] and "memlock" in _service("gpu")["ulimits"]


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_ports_environment_volumes_and_health(mode: str) -> None:
    assert _service(mode)["ports"] == ["127.0.0.1:8000:8000", "127.0.0.1:8001:8001", "127.0.0.1:8002:8002"]
    env = {"TRITON_HTTP_PORT": "9000", "TRITON_GRPC_PORT": "9001", "TRITON_METRICS_PORT": "9002",
           "TRITON_HOST": "0.0.0.0", "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1", "TRITON_VLM_TINY": "1"}
    service = _service(mode, env)
    assert service["ports"] == ["0.0.0.0:9000:8000", "0.0.0.0:9001:8001", "0.0.0.0:9002:8002"]
    assert service["environment"]["HF_TOKEN"] == "hf_x" and service["environment"]["HF_HUB_OFFLINE"] == "1"
    assert service["environment"]["TRITON_VLM_TINY"] == "1"
    assert "hf-cache:/cache/huggingface" in service["volumes"]
    assert "/srv/hf:/cache/huggingface" in _service(mode, {"TRITON_VLM_HF_CACHE": "/srv/hf"})["volumes"]
    assert {"hf-cache", "triton-vlm-cache"} <= set(load(mode)["volumes"])
    health = service["healthcheck"]
    assert health["test"][0] == "CMD" and "http://127.0.0.1:8000/v2/health/ready" in health["test"][-1]
    assert service["restart"] == "unless-stopped"
    assert service["shm_size"] == "2gb"
    assert service["stop_grace_period"] == "45s"


# -- the optional monitoring profile (Prometheus + Grafana) ------------------------------------------------------
@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_monitoring_profile_is_opt_in(mode: str) -> None:
    services = interpolate(load(mode), {})["services"]
    assert "profiles" not in services["triton"]  # `docker compose up` still starts only the server
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        assert services[name]["restart"] == "unless-stopped"
    assert services["prometheus"]["depends_on"] == ["triton"]
    assert services["grafana"]["depends_on"] == ["prometheus"]


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_monitoring_mounts_the_project_configs(mode: str) -> None:
    services = interpolate(load(mode), {})["services"]
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target, *options = volume.split(":")
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
                assert options == ["ro"]
                mounts[target] = ROOT / source
    assert mounts["/etc/prometheus/prometheus.yml"].is_file()
    assert (mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").is_file()
    assert (mounts["/etc/grafana/dashboards"] / "triton-vlm.json").is_file()
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/etc/grafana/dashboards/triton-vlm.json"
    provider = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "dashboards" / "triton-vlm.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    assert {"prometheus-data", "grafana-data"} <= set(load(mode)["volumes"])


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_prometheus_target_is_the_servers_metrics_port(mode: str) -> None:
    """prometheus.yml scrapes <service>:8002, a service of this file whose container metrics port is 8002."""
    services = interpolate(load(mode), {})["services"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (target,) = config["scrape_configs"][0]["static_configs"][0]["targets"]
    service, port = target.split(":")
    assert service in services and port == "8002"
    assert any(p.endswith(":8002") for p in services[service]["ports"])
    datasource = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources" /
                                 "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_monitoring_ports_and_settings(mode: str) -> None:
    services = interpolate(load(mode), {})["services"]
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    env = {"MONITORING_HOST": "0.0.0.0", "PROMETHEUS_PORT": "19090", "GRAFANA_PORT": "13000",
           "GRAFANA_ADMIN_PASSWORD": "s3cret", "PROMETHEUS_RETENTION": "2d"}
    services = interpolate(load(mode), env)["services"]
    assert services["prometheus"]["ports"] == ["0.0.0.0:19090:9090"]
    assert services["grafana"]["ports"] == ["0.0.0.0:13000:3000"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    assert "--storage.tsdb.retention.time=2d" in services["prometheus"]["command"]
    assert validate(interpolate(load(mode), env)) == []


def test_the_schema_catches_profile_mistakes() -> None:
    broken = copy.deepcopy(load("cpu"))
    broken["services"]["grafana"]["profiles"] = "monitoring"  # must be a list
    assert any("profiles" in error for error in validate(broken))


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_log_level_reaches_the_container(mode: str) -> None:
    assert _service(mode)["environment"]["TRITON_VLM_LOG_LEVEL"] == "INFO"
    assert _service(mode, {"TRITON_VLM_LOG_LEVEL": "DEBUG"})["environment"]["TRITON_VLM_LOG_LEVEL"] == "DEBUG"
