"""The Helm chart (deploy/helm/triton-vlm), rendered by Helm's own Go SDK (helm-python-sdk, no cluster), its
manifests validated against the Kubernetes schemas (kubernetes-validate, strict: unknown fields fail) and the
ServiceMonitor against the Prometheus Operator's CRD schema (vendored)."""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from tests.conftest import ROOT

CHART = ROOT / "deploy" / "helm" / "triton-vlm"
EXAMPLES = ROOT / "deploy" / "helm" / "examples"
SCHEMAS = ROOT / "tests" / "data" / "schemas"
#: The chart's kubeVersion floor, a middle one, and the newest the schema package knows.
KUBE_VERSIONS = ("1.25.0", "1.30.0", kubernetes_validate.latest_version())
#: The metrics prometheus-adapter's rule reads; tests/integration checks the real server exports them.
TRITON_METRICS = {"nv_inference_queue_duration_us", "nv_inference_request_success"}


def example(name: str) -> dict[str, Any]:
    return helm.values_from_yaml((EXAMPLES / name).read_text())


SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "fleet": example("fleet-values.yaml"),
    "cpu": example("cpu-values.yaml"),
    "token-value-existing-claim": {"huggingface": {"token": {"value": "hf_x"}, "offline": True},
                                   "persistence": {"existingClaim": "models"}, "models": ["llava"],
                                   "extraEnv": [{"name": "TRITON_VLM_LLAVA_DTYPE", "value": "float16"}]},
    "hpa-without-monitor": {"autoscaling": {"enabled": True}, "persistence": {"accessModes": ["ReadWriteOnce"]}},
    "openai": {"openai": {"enabled": True, "apiKeySecret": "vlm-openai-keys",
                          "corsOrigins": ["https://app.example.com"]}},
    "openai-open": {"openai": {"enabled": True, "port": 9100}, "service": {"ports": {"openai": 80}}},
}


@cache
def render(scenario: str) -> dict[str, dict[str, Any]]:
    """kind -> manifest, for one scenario (release "vlm" in namespace "ml")."""
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(SCENARIOS[scenario])
        files = chart.render(SCENARIOS[scenario], name="vlm", namespace="ml")
    manifests: dict[str, dict[str, Any]] = {}
    for name, text in files.items():
        if not name.endswith(".yaml"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                assert document["kind"] not in manifests, f"two {document['kind']}s"
                manifests[document["kind"]] = document
    return manifests


def notes(scenario: str) -> str:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(SCENARIOS[scenario], name="vlm", namespace="ml")["triton-vlm/templates/NOTES.txt"]


def strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields rejected (the API server would silently prune them)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


SERVICE_MONITOR_SCHEMA = strict(json.loads((SCHEMAS / "servicemonitor-monitoring.coreos.com-v1.json").read_text()))


def validate(manifest: dict[str, Any], version: str) -> None:
    if manifest["kind"] == "ServiceMonitor":
        assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
        jsonschema.Draft7Validator(SERVICE_MONITOR_SCHEMA).validate(manifest)
    else:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_helm_lint_is_clean() -> None:
    report = helm.lint(str(CHART), strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_rendered_manifests_match_the_kubernetes_schemas(scenario: str, version: str) -> None:
    for manifest in render(scenario).values():
        validate(manifest, version)


def test_validation_is_not_vacuous() -> None:
    deployment = copy.deepcopy(render("defaults")["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    hpa = copy.deepcopy(render("fleet")["HorizontalPodAutoscaler"])
    hpa["spec"]["metrics"][0]["pods"]["target"]["type"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, "1.30.0", strict=True)
    monitor = copy.deepcopy(render("fleet")["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, "1.30.0")


def test_values_schema_rejects_typos() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"autoscalling": {"enabled": True}})
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"gpu": {"count": 0}})
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"persistence": {"accessModes": ["ReadWriteAll"]}})


def test_defaults_one_gpu_pod_without_monitoring_crds() -> None:
    manifests = render("defaults")
    assert set(manifests) == {"Deployment", "Service", "PersistentVolumeClaim"}  # nothing needing CRDs/adapter
    deployment = manifests["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["triton-vlm", "serve", "--host", "0.0.0.0", "--instance-kind", "gpu"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TRITON_VLM_PRELOAD"] == "1" and env["TRITON_VLM_MODELS"] == "" and env["HF_HUB_OFFLINE"] == "0"
    assert env["HF_HOME"] == "/cache/huggingface" and "HF_TOKEN" not in env


def test_probes_use_tritons_health_endpoints() -> None:
    (container,) = render("defaults")["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # time to download weights
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001,
                                                                          "metrics": 8002}


def test_cache_volume_and_shared_memory() -> None:
    manifests = render("defaults")
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = manifests["PersistentVolumeClaim"]
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"model-cache": "/cache", "dshm": "/dev/shm"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] == 1000


def test_service_exposes_http_grpc_metrics_to_the_pods() -> None:
    manifests = render("defaults")
    service = manifests["Service"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (8000, "http"), "grpc": (8001, "grpc"), "metrics": (8002, "metrics")}
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert manifests["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_fleet_autoscales_on_queue_time_and_is_scraped() -> None:
    manifests = render("fleet")
    assert set(manifests) == {"Deployment", "Service", "PersistentVolumeClaim", "ServiceMonitor",
                              "HorizontalPodAutoscaler"}
    deployment, hpa = manifests["Deployment"], manifests["HorizontalPodAutoscaler"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 8)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "200000"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300

    monitor, service = manifests["ServiceMonitor"], manifests["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    assert env["TRITON_VLM_MODELS"]["value"] == "llava,kosmos2"
    assert "Secret" not in manifests  # existingSecret: the chart creates none


def test_cpu_cluster_has_no_gpu_request() -> None:
    manifests = render("cpu")
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][-1] == "cpu"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert "tolerations" not in pod
    assert {v["name"]: v for v in pod["volumes"]}["model-cache"] == {"name": "model-cache", "emptyDir": {}}
    assert "PersistentVolumeClaim" not in manifests
    assert {e["name"]: e.get("value") for e in container["env"]}["TRITON_VLM_TINY"] == "1"


def test_token_value_creates_a_secret_and_existing_claim_is_used() -> None:
    manifests = render("token-value-existing-claim")
    secret = manifests["Secret"]
    assert secret["stringData"] == {"HF_TOKEN": "hf_x"}
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert env["HF_HUB_OFFLINE"]["value"] == "1" and env["TRITON_VLM_LLAVA_DTYPE"]["value"] == "float16"
    assert {v["name"]: v for v in pod["volumes"]}["model-cache"]["persistentVolumeClaim"]["claimName"] == "models"
    assert "PersistentVolumeClaim" not in manifests


def test_notes_warn_about_missing_scraping_and_rwo_fleets() -> None:
    text = notes("hpa-without-monitor")
    assert "serviceMonitor.enabled is false" in text and "ReadWriteOnce" in text
    assert "NOTE" not in notes("fleet")


def adapter_rule() -> dict[str, Any]:
    values = yaml.safe_load((EXAMPLES / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def test_prometheus_adapter_rule_is_valid_promql_over_tritons_metrics() -> None:
    rule = adapter_rule()
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # prometheus-adapter fills these templates per query; any valid filling must parse.
    query = rule["metricsQuery"].replace("<<.LabelMatchers>>", 'namespace="ml",pod=~"vlm-a|vlm-b"') \
        .replace("<<.GroupBy>>", "pod")
    expression = promql_parser.parse(query)
    rendered = str(expression)
    assert {name for name in TRITON_METRICS if name in rendered} == TRITON_METRICS
    series = promql_parser.parse(rule["seriesQuery"])
    assert "nv_inference_queue_duration_us" in str(series)
    assert rule["name"]["as"] == render("fleet")["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"][
        "metric"]["name"]


def test_openai_front_is_off_by_default_and_wired_through_when_on() -> None:
    default = render("defaults")["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "--openai-port" not in default["args"] and "openai" not in {p["name"] for p in default["ports"]}
    manifests = render("openai")
    container = manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--openai-port") + 1] == "9000" and args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--cors-origin") + 1] == "https://app.example.com"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["openai"] == 9000
    key = {e["name"]: e for e in container["env"]}["TRITON_VLM_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "vlm-openai-keys", "key": "api-keys"}
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in manifests["Service"]["spec"]["ports"]}
    assert ports["openai"] == (9000, "openai")
    assert "Secret" not in manifests  # the keys stay in the user's own Secret
    assert "localhost:9000/v1/models -H" in notes("openai") and "needs no key" not in notes("openai")


def test_openai_front_without_keys_is_flagged_and_ports_are_configurable() -> None:
    manifests = render("openai-open")
    container = manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--openai-port") + 1] == "9100"
    assert "TRITON_VLM_API_KEY" not in {e["name"] for e in container["env"]}
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in manifests["Service"]["spec"]["ports"]}
    assert ports["openai"] == (80, "openai")
    assert "needs no key" in notes("openai-open")
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(Exception, match="apiKey"):
        chart.validate_schema({"openai": {"enabled": True, "apiKey": "sk-in-values"}})  # no keys in values
