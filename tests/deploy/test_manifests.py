"""The Kubernetes manifests: every overlay renders, validates offline and keeps its invariants.

Rendering uses ``kubectl kustomize`` (offline). Built-in kinds are validated against the
Kubernetes JSON schemas shipped with ``kubernetes-validate`` (strict: unknown fields fail); the
custom resources (ServiceMonitor, PrometheusRule, KEDA's ScaledObject) against small structural
schemas of the fields we use (tests/deploy/schemas/<kind>-<group>-<version>.json).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).parent / "schemas"
OVERLAYS = ("dev", "gpu")
KUBERNETES_VERSION = "1.30"  # the oldest version we support: native gRPC probes are GA since 1.27
GPU = "nvidia.com/gpu"
PROVISION = "provision-models"  # the GPU workers' init container: reads files, no database, no GPU

Doc = dict[str, Any]

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def render(path: Path) -> list[Doc]:
    """`kubectl kustomize <path>` parsed into a list of resources."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(DEPLOY / "overlays" / request.param)


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod spec) for every Deployment and Job."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for workload, spec in pod_specs(docs):
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield workload, container


def generated(docs: list[Doc], prefix: str) -> Doc:
    """The ConfigMap kustomize generated from ``prefix`` (its name carries a hash suffix)."""
    maps = [
        d
        for d in find(docs, "ConfigMap")
        if re.fullmatch(rf"{prefix}-[a-z0-9]+", d["metadata"]["name"])
    ]
    assert len(maps) == 1, prefix
    return maps[0]


def server_config(docs: list[Doc]) -> dict[str, Any]:
    """The config.yaml that service/config.py reads (through EDGEPRUNE_CONFIG)."""
    return yaml.safe_load(generated(docs, "edgeprune-config")["data"]["config.yaml"])


def container_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """Plain environment of a container: its env ConfigMaps, then its own literal values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(one(docs, "ConfigMap", name)["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def setting(docs: list[Doc], container: Doc, name: str) -> Any:
    """A setting as the process sees it: EDGEPRUNE_<NAME> overrides the config file."""
    return container_env(docs, container).get(
        f"EDGEPRUNE_{name.upper()}", server_config(docs)[name]
    )


def validate(doc: Doc) -> None:
    group, _, version = doc["apiVersion"].rpartition("/")
    if "." in group and not group.endswith(".k8s.io"):  # a CRD's group, e.g. keda.sh
        path = SCHEMAS / f"{doc['kind'].lower()}-{group.split('.')[0]}-{version}.json"
        jsonschema.Draft202012Validator(json.loads(path.read_text())).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def render_with_components(tmp_path: Path, overlay: str, *components: str) -> list[Doc]:
    """An overlay plus optional components (deploy/components/), as a user's overlay adds them."""
    namespace = yaml.safe_load((DEPLOY / "overlays" / overlay / "kustomization.yaml").read_text())[
        "namespace"
    ]
    here = tmp_path / "overlay"
    here.mkdir()
    kustomization = {
        "namespace": namespace,
        "resources": [os.path.relpath(DEPLOY / "overlays" / overlay, here)],
        "components": [os.path.relpath(DEPLOY / "components" / c, here) for c in components],
    }
    (here / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(here)


def test_base_renders() -> None:
    kinds = {d["kind"] for d in render(DEPLOY / "base")}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Job"} <= kinds
    assert {"ServiceMonitor", "ServiceAccount", "PrometheusRule"} <= kinds


def test_every_resource_validates_against_its_schema(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    for doc in docs:
        validate(doc)


def test_validation_rejects_a_misspelt_field(overlay: tuple[str, list[Doc]]) -> None:
    """The offline validation is strict: a typo in a manifest fails it."""
    _, docs = overlay
    deployment = copy.deepcopy(one(docs, "Deployment", "edgeprune-api"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    monitor = copy.deepcopy(find(docs, "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    rule = copy.deepcopy(one(docs, "PrometheusRule", "edgeprune"))
    rule["spec"]["groups"][0]["rules"][0]["fro"] = "5m"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)
    for scaler in find(docs, "ScaledObject"):
        scaler = copy.deepcopy(scaler)
        scaler["spec"]["minReplicas"] = 0
        with pytest.raises(jsonschema.ValidationError):
            validate(scaler)


def test_api_has_native_grpc_probes_on_its_serving_port(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    api = one(docs, "Deployment", "edgeprune-api")["spec"]["template"]["spec"]["containers"][0]
    grpc_port = next(p["containerPort"] for p in api["ports"] if p["name"] == "grpc")
    assert int(setting(docs, api, "port")) == grpc_port
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert api[probe]["grpc"]["port"] == grpc_port, probe
    # health is NOT_SERVING while draining: readiness drops the pod, liveness must not kill it
    liveness = api["livenessProbe"]
    patience = liveness["periodSeconds"] * liveness["failureThreshold"]
    assert patience > float(setting(docs, api, "drain_grace_s"))


def test_worker_probes_read_the_job_loop_on_the_metrics_port(
    overlay: tuple[str, list[Doc]], tmp_path: Path
) -> None:
    """Workers serve no gRPC; their probes are the metrics port's /livez (the job loop is not
    stalled; /metrics alone answers for a hung loop too) and /readyz (warm, database reached),
    and the stall limit leaves room for a long model load."""
    config_module = pytest.importorskip("edgeprune.service.config")
    _, docs = overlay
    worker = one(docs, "Deployment", "edgeprune-worker")["spec"]["template"]["spec"]["containers"][
        0
    ]
    metrics = next(p for p in worker["ports"] if p["name"] == "metrics")
    assert int(setting(docs, worker, "metrics_port")) == metrics["containerPort"]
    paths = {probe: worker[probe]["httpGet"] for probe in
             ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {p["port"] for p in paths.values()} == {"metrics"}
    assert paths["startupProbe"]["path"] == paths["livenessProbe"]["path"] == "/livez"
    assert paths["readinessProbe"]["path"] == "/readyz"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(generated(docs, "edgeprune-config")["data"]["config.yaml"])
    env = {**container_env(docs, worker), "EDGEPRUNE_CONFIG": str(config_file)}
    config = config_module.load_config(None, environ=env)
    assert config.liveness_timeout_s >= 300, "a model load must not look like a stalled loop"


def test_metrics_listen_on_the_pod_network(overlay: tuple[str, list[Doc]]) -> None:
    """The service binds /metrics to loopback by default; pods must open it to be scraped."""
    _, docs = overlay
    for _, container in containers(docs):
        if any(p["name"] == "metrics" for p in container.get("ports", [])):
            assert setting(docs, container, "metrics_host") == "0.0.0.0", container["name"]


def test_gpu_limits_only_on_gpu_workers(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    for workload, container in containers(docs):
        resources = container["resources"]
        gpus = int(resources.get("limits", {}).get(GPU, 0))
        if container["name"] == PROVISION:
            assert gpus == 0
            continue
        if name == "gpu" and workload["metadata"]["name"] == "edgeprune-worker":
            assert gpus >= 1, "GPU workers must request nvidia.com/gpu"
            assert int(resources["requests"].get(GPU, gpus)) == gpus, "GPU request != limit"
            assert setting(docs, container, "device") == "cuda"
        else:
            assert gpus == 0, f"{workload['metadata']['name']} must not take a GPU in {name}"
            if workload["kind"] == "Deployment":
                assert setting(docs, container, "device") == "cpu"


def prestop_seconds(container: Doc) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


def test_grace_period_covers_prestop_and_checkpoint(overlay: tuple[str, list[Doc]]) -> None:
    """SIGTERM arrives after preStop; the process then has drain_grace_s to drain / checkpoint."""
    _, docs = overlay
    for deployment in find(docs, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        grace = spec["terminationGracePeriodSeconds"]
        for container in spec["containers"]:
            prestop = prestop_seconds(container)
            assert prestop >= 1, "a preStop delay lets the endpoints drop the pod first"
            drain = float(setting(docs, container, "drain_grace_s"))
            assert grace >= prestop + drain + 10, (
                f"{deployment['metadata']['name']}: grace {grace}s"
            )


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions In/Exists) matches labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] == "Exists" and expr["key"] not in labels:
            return False
    return True


def test_every_deployment_has_a_disruption_budget(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    budgets = find(docs, "PodDisruptionBudget")
    for deployment in find(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"], labels)
        matching = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert len(matching) == 1, deployment["metadata"]["name"]
        # a budget that allows no disruption at all would block every node drain
        spec = matching[0]["spec"]
        if "minAvailable" in spec:
            assert spec["minAvailable"] < deployment["spec"]["replicas"]
        else:
            assert spec["maxUnavailable"] >= 1


def test_database_url_comes_from_a_secret_never_inlined(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    assert not find(docs, "Secret"), "secrets are created out of band, never committed"
    credential_url = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|DATABASE_URL", re.IGNORECASE)
    for cm in find(docs, "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert not secretish.search(key), f"{key} belongs in a Secret"
            assert not credential_url.search(value), f"credentials in ConfigMap key {key}"
    assert not {"database_url", "auth_tokens"} & set(server_config(docs)), "secrets in config.yaml"
    users = 0
    for workload, container in containers(docs):
        env = {e["name"]: e for e in container.get("env", [])}
        for item in env.values():
            assert not credential_url.search(str(item.get("value", ""))), item
        if container["name"] == PROVISION:
            assert "EDGEPRUNE_DATABASE_URL" not in env
            continue
        ref = env["EDGEPRUNE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "edgeprune-database", "key": "url"}
        users += 1
        if "EDGEPRUNE_AUTH_TOKENS" in env:
            assert (
                env["EDGEPRUNE_AUTH_TOKENS"]["valueFrom"]["secretKeyRef"]["name"]
                == "edgeprune-auth"
            )
    assert users == 3


def test_settings_are_ones_the_service_reads(
    overlay: tuple[str, list[Doc]], tmp_path: Path
) -> None:
    """config.yaml and every EDGEPRUNE_* variable load through service/config.py unchanged."""
    config_module = pytest.importorskip("edgeprune.service.config")
    name, docs = overlay
    config_file = tmp_path / "config.yaml"
    config_file.write_text(generated(docs, "edgeprune-config")["data"]["config.yaml"])
    known = {
        f"EDGEPRUNE_{n.upper()}"
        for n in [*config_module.CONFIG_FIELDS, *config_module.LIMIT_FIELDS]
    }
    known |= {
        "EDGEPRUNE_CONFIG",
        "EDGEPRUNE_CACHE_DIR",
    }  # the file itself; the engine's model cache
    for workload, container in containers(docs):
        env = container_env(docs, container)
        assert {k for k in env if k.startswith("EDGEPRUNE_")} <= known, workload["metadata"]["name"]
        env["EDGEPRUNE_CONFIG"] = str(config_file)
        config = config_module.load_config(None, environ=env)
        assert config.device == setting(docs, container, "device")
        assert config.data_dir == "/var/lib/edgeprune/data"
        assert config.log_format == ("json" if name == "gpu" else "text")
        if workload["kind"] == "Deployment":  # the migration Job loads no model
            assert env["EDGEPRUNE_CACHE_DIR"] == "/var/lib/edgeprune/models"


def test_config_maps_referenced_by_pods_exist(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    names = {d["metadata"]["name"] for d in find(docs, "ConfigMap")}
    for _, spec in pod_specs(docs):
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert find(docs, "PersistentVolumeClaim", claim), claim
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in names
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}


def test_model_allow_list_maps_short_names_to_references(overlay: tuple[str, list[Doc]]) -> None:
    overlay_name, docs = overlay
    models = server_config(docs)["models"]
    assert models["smollm2-135m"] == "smollm2-135m"
    for name, entry in models.items():
        ref = entry if isinstance(entry, str) else entry["ref"]
        if overlay_name == "gpu" and ref.startswith("hf:"):
            # the API pod does not mount the workers' model volume: the entry records the shape
            assert entry["config"]["model_type"], name
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name), name
        assert ref == "smollm2-135m" or ref.startswith(
            ("hf:/var/lib/edgeprune/models/", "tracr:")
        ), ref
    mounts = {
        m["mountPath"]
        for _, c in containers(docs)
        for m in c.get("volumeMounts", [])
        if m["name"] == "config"
    }
    assert mounts == {"/etc/edgeprune"}


def test_pods_run_as_non_root_with_a_locked_down_container(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    for workload, spec in pod_specs(docs):
        name = workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name


def test_containers_have_resource_requests_and_memory_limits(
    overlay: tuple[str, list[Doc]],
) -> None:
    _, docs = overlay
    images = set()
    for workload, container in containers(docs):
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), workload["metadata"]["name"]
        assert "memory" in resources["limits"], workload["metadata"]["name"]
        images.add(container["image"])
    assert len(images) == 1, f"one image for every component: {images}"
    image = images.pop()
    assert ":" in image and not image.endswith(":latest"), image


def test_services_expose_grpc_and_metrics_and_are_scraped(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    api = one(docs, "Service", "edgeprune-api")
    assert {p["name"] for p in api["spec"]["ports"]} == {"grpc", "metrics"}
    api_pods = one(docs, "Deployment", "edgeprune-api")["spec"]["template"]["metadata"]["labels"]
    assert selects({"matchLabels": api["spec"]["selector"]}, api_pods)
    monitor = one(docs, "ServiceMonitor", "edgeprune")
    # kube-prometheus-stack's Prometheus selects ServiceMonitors by its release label
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selected = [
        s
        for s in find(docs, "Service")
        if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    # a Service without the metrics port gives the operator no target: each pod is scraped once
    scraped = [s for s in selected if "metrics" in {p["name"] for p in s["spec"]["ports"]}]
    assert {s["metadata"]["name"] for s in scraped} == {"edgeprune-api", "edgeprune-worker"}
    for service in scraped:
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert all(e["port"] in ports for e in monitor["spec"]["endpoints"])


def test_migration_job_migrates_a_database(overlay: tuple[str, list[Doc]], tmp_path: Path) -> None:
    """Run the Job's own command against a fresh SQLite database."""
    _, docs = overlay
    (job,) = find(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in ("OnFailure", "Never") and job["spec"]["backoffLimit"] >= 1
    command = spec["containers"][0]["command"]
    assert command == ["python", "-m", "edgeprune.service", "migrate"]
    url = f"sqlite:///{tmp_path / 'edgeprune.db'}"
    out = subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, "EDGEPRUNE_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    with sqlite3.connect(tmp_path / "edgeprune.db") as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision


def test_gpu_workers_provision_the_model_volume_before_they_start(tmp_path: Path) -> None:
    """The init container's own command, environment and config on an empty volume where the
    default model was converted before: that is found, every hf: folder is missing (exit 1)."""
    from tests.service.test_provision import converted_default_model

    docs = render(DEPLOY / "overlays" / "gpu")
    pod = one(docs, "Deployment", "edgeprune-worker")["spec"]["template"]["spec"]
    (init,), worker = pod["initContainers"], pod["containers"][0]
    assert init["name"] == PROVISION and init["image"] == worker["image"]
    assert init["command"] == ["python", "-m", "edgeprune.service", "provision-models"]
    mounts = [{m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (init, worker)]
    env = container_env(docs, init)
    assert mounts[0]["model-cache"] == mounts[1]["model-cache"] == env["EDGEPRUNE_CACHE_DIR"]
    assert mounts[0]["config"] == mounts[1]["config"]
    volume = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert volume["persistentVolumeClaim"]["claimName"]  # one volume: converted once for all
    config_file = tmp_path / "config.yaml"
    config_file.write_text(generated(docs, "edgeprune-config")["data"]["config.yaml"])
    converted_default_model(tmp_path / "models")
    env.update(EDGEPRUNE_CONFIG=str(config_file), EDGEPRUNE_CACHE_DIR=str(tmp_path / "models"))
    out = subprocess.run(
        [sys.executable, *init["command"][1:]],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")}, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 1, out.stderr
    states = dict(line.split()[1::-1] for line in out.stdout.splitlines())
    assert states.pop("smollm2-135m") == "present"
    assert set(states.values()) == {"missing"} and len(states) == 4, out.stdout


def test_headless_api_service_lists_every_api_pod_for_client_round_robin(
    overlay: tuple[str, list[Doc]],
) -> None:
    _, docs = overlay
    headless = one(docs, "Service", "edgeprune-api-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert not headless.get("publishNotReadyAddresses"), "DNS must only list ready pods"
    api = one(docs, "Deployment", "edgeprune-api")["spec"]["template"]
    assert selects({"matchLabels": headless["selector"]}, api["metadata"]["labels"])
    grpc_port = next(p for p in api["spec"]["containers"][0]["ports"] if p["name"] == "grpc")
    assert [(p["name"], p["targetPort"]) for p in headless["ports"]] == [("grpc", "grpc")]
    assert headless["ports"][0]["port"] == grpc_port["containerPort"]
    assert one(docs, "Service", "edgeprune-api")["spec"]["type"] == "ClusterIP"


def test_migration_job_is_a_hook_named_after_its_image(overlay: tuple[str, list[Doc]]) -> None:
    """A new image is a new Job (a Job's template is immutable); Argo CD and Helm run it first."""
    _, docs = overlay
    (job,) = find(docs, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["argocd.argoproj.io/hook"] == "PreSync"
    assert annotations["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    assert 0 < job["spec"]["ttlSecondsAfterFinished"] <= 7 * 86400
    container = job["spec"]["template"]["spec"]["containers"][0]
    tag = container["image"].rpartition(":")[2]
    name = job["metadata"]["name"]
    assert name == f"edgeprune-migrate-{tag}"
    # the pods' job-name label holds the name: a label value is at most 63 characters
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name), name
    # a hook runs before the sync creates the ConfigMaps and the ServiceAccount: it needs none
    spec = job["spec"]["template"]["spec"]
    assert "serviceAccountName" not in spec
    assert not container.get("envFrom") and not any("configMap" in v for v in spec["volumes"])


def test_overlay_images_apply(overlay: tuple[str, list[Doc]]) -> None:
    """An overlay's `images` entry must match the name the base left, or it silently does nothing."""
    name, docs = overlay
    kustomization = yaml.safe_load((DEPLOY / "overlays" / name / "kustomization.yaml").read_text())
    images = {c["image"] for _, c in containers(docs)}
    for entry in kustomization.get("images", []):
        wanted = f"{entry.get('newName', entry['name'])}:{entry['newTag']}"
        assert images == {wanted}, (entry, images)


def autoscaled_worker(docs: list[Doc], kind: str) -> Doc:
    """The one autoscaler of the worker Deployment, which then leaves its replicas alone."""
    scalers = find(docs, "ScaledObject") + find(docs, "HorizontalPodAutoscaler")
    assert [s["kind"] for s in scalers] == [kind], "one autoscaler per Deployment"
    worker = one(docs, "Deployment", "edgeprune-worker")
    assert "replicas" not in worker["spec"], "an applied replica count fights the autoscaler"
    assert scalers[0]["spec"]["scaleTargetRef"]["name"] == "edgeprune-worker"
    return scalers[0]


def test_gpu_workers_scale_to_zero_with_keda_on_the_queue() -> None:
    docs = render(DEPLOY / "overlays" / "gpu")
    for doc in docs:
        validate(doc)
    spec = autoscaled_worker(docs, "ScaledObject")["spec"]
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    # idle for minutes before the last GPU goes; a running job keeps its worker
    assert spec["cooldownPeriod"] >= 300
    assert spec["fallback"]["replicas"] >= 1
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert "edgeprune_queue_pending_jobs" in query and "edgeprune_workers_busy" in query
    namespace = one(docs, "Deployment", "edgeprune-worker")["metadata"]["namespace"]
    assert query.count(f'namespace="{namespace}"') == 2
    assert trigger["metadata"]["ignoreNullValues"] == "false"
    assert float(trigger["metadata"]["threshold"]) == 1  # one job per worker (workers: 1)
    assert server_config(docs)["workers"] == 1
    budget = one(docs, "PodDisruptionBudget", "edgeprune-worker")["spec"]
    assert "minAvailable" not in budget, "a minAvailable budget blocks scaling to zero"


def test_hpa_component_scales_on_the_adapters_external_metric(tmp_path: Path) -> None:
    docs = render_with_components(tmp_path, "dev", "hpa")
    for doc in docs:
        validate(doc)
    hpa = autoscaled_worker(docs, "HorizontalPodAutoscaler")
    assert hpa["metadata"]["namespace"] == "edgeprune-dev"
    spec = hpa["spec"]
    assert spec["minReplicas"] >= 1 and spec["maxReplicas"] >= spec["minReplicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    values = yaml.safe_load((DEPLOY / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["external"]
    assert rule["name"]["as"] == metric["external"]["metric"]["name"]
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
