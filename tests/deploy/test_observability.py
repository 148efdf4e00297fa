"""Alerts, dashboard and autoscaling queries: promtool parses and evaluates them, and every metric
they read is one that service/metrics.py exports (a renamed metric fails here, not on call)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_manifests import DEPLOY, find, one, render

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")

#: Series that Prometheus and kube-state-metrics (kube-prometheus-stack) provide, not edgeprune.
EXTERNAL = {"up", "kube_pod_container_status_restarts_total"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render(DEPLOY / "overlays" / "gpu")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Series names the service's registry exposes: every metric of service/metrics.py and the
    queue depth that its registry adds at scrape time."""
    from prometheus_client.metrics import MetricWrapperBase

    from edgeprune.service import metrics

    families = [f for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)
                for f in m.describe()]
    with pytest.MonkeyPatch.context() as patch:  # a registry of its own, not the global one
        patch.setenv(metrics.MULTIPROC_ENV, str(tmp_path_factory.mktemp("metrics")))
        families += list(metrics.registry(pending=lambda: 3, oldest_age=lambda: 60.0).collect())
    names = {f.name + suffix for f in families for suffix in _SUFFIXES[f.type]}
    assert {"edgeprune_queue_pending_jobs", "edgeprune_queue_oldest_pending_seconds",
            "grpc_server_handled_total"} <= names
    return names


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions, labels, keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text):
        if match.group(1) not in {"and", "or", "unless", "bool", "offset", "inf", "nan"}:
            names.add(match.group(1))
    assert names, expr
    return names


def promtool(*args: str, cwd: Path) -> None:
    out = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def rules_file(docs: list[dict[str, Any]], folder: Path, *, annotations: bool = True) -> Path:
    """The PrometheusRule's groups as a Prometheus rules file (without the annotations for unit
    tests, which would otherwise compare every rendered text)."""
    spec = one(docs, "PrometheusRule", "edgeprune")["spec"]
    if not annotations:
        spec = {"groups": [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"}
                                           for r in g["rules"]]} for g in spec["groups"]]}
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_metric_names_are_extracted() -> None:
    assert metric_names('sum by (le) (rate(a_bucket{x="y"}[5m])) / on (ns) b + c') == {
        "a_bucket", "b", "c"}


def test_rules_pass_promtool_and_read_exported_metrics(
    docs: list[dict[str, Any]], exported: set[str], tmp_path: Path
) -> None:
    rule = one(docs, "PrometheusRule", "edgeprune")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    promtool("check", "rules", str(rules_file(docs, tmp_path)), cwd=tmp_path)
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    for name, alert in alerts.items():
        assert metric_names(alert["expr"]) <= exported | EXTERNAL, name
        assert alert["labels"]["severity"] in ("warning", "critical"), name
    assert {"EdgepruneNoWorkerForPendingJobs", "EdgepruneQueueGrowing", "EdgepruneJobsFailing",
            "EdgepruneApiErrors", "EdgepruneWorkerRestarting", "EdgepruneQueueStalled",
            "EdgepruneJobWaitingLong", "EdgepruneLeasesExpiring"} <= set(alerts)


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in {"namespace": "edgeprune", **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def test_alerts_fire_on_their_conditions(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert fires on its condition and stays quiet otherwise."""
    rules_file(docs, tmp_path, annotations=False)
    pending = _series("edgeprune_queue_pending_jobs", "3+0x60", pod="api-0")
    waiting = _series("edgeprune_queue_oldest_pending_seconds", "0+60x200", pod="api-0")
    unary = {"grpc_type": "unary", "grpc_service": "edgeprune.v1.JobService",
             "grpc_method": "GetJob"}
    tests = [
        {   # pending jobs, no worker at all (scaled to zero and never back)
            "interval": "1m", "input_series": [pending, waiting],
            "alert_rule_test": [
                {"eval_time": "33m", "alertname": "EdgepruneQueueStalled", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "EdgepruneNoWorkerForPendingJobs", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "EdgepruneNoWorkerForPendingJobs", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "namespace": "edgeprune"}}]},
                {"eval_time": "40m", "alertname": "EdgepruneQueueStalled", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "edgeprune"}}]},
            ],
        },
        {   # a worker is up and jobs finish: quiet, until the oldest job has waited 2 h
            "interval": "1m",
            "input_series": [pending, waiting,
                             _series("edgeprune_workers", "1+0x200", pod="worker-0"),
                             _series("edgeprune_jobs_finished_total", "0+1x200", kind="prune",
                                     state="SUCCEEDED"),
                             _series("edgeprune_lease_expiries_total", "0+0x60", state="PENDING")],
            "alert_rule_test": [
                {"eval_time": "40m", "alertname": "EdgepruneNoWorkerForPendingJobs", "exp_alerts": []},
                {"eval_time": "40m", "alertname": "EdgepruneQueueStalled", "exp_alerts": []},
                {"eval_time": "40m", "alertname": "EdgepruneJobsFailing", "exp_alerts": []},
                {"eval_time": "60m", "alertname": "EdgepruneLeasesExpiring", "exp_alerts": []},
                {"eval_time": "130m", "alertname": "EdgepruneJobWaitingLong", "exp_alerts": []},
                {"eval_time": "140m", "alertname": "EdgepruneJobWaitingLong", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "edgeprune"}}]},
            ],
        },
        {   # a lease expires every 10 min (workers keep dying mid-job), per worker pod
            "interval": "1m",
            "input_series": [
                _series("edgeprune_lease_expiries_total", "0+0.1x120", state="PENDING",
                        pod="worker-0"),
                _series("edgeprune_lease_expiries_total", "0+0.05x120", state="FAILED",
                        pod="worker-1")],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "EdgepruneLeasesExpiring", "exp_alerts": []},
                {"eval_time": "90m", "alertname": "EdgepruneLeasesExpiring", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "edgeprune"}}]},
            ],
        },
        {   # 10 % of unary calls fail with INTERNAL, half of the jobs fail, the queue grows
            "interval": "1m",
            "input_series": [
                _series("grpc_server_handled_total", "0+90x60", grpc_code="OK", **unary),
                _series("grpc_server_handled_total", "0+10x60", grpc_code="INTERNAL", **unary),
                _series("grpc_server_handled_total", "0+50x60", grpc_code="NOT_FOUND", **unary),
                _series("edgeprune_jobs_finished_total", "0+1x60", kind="prune", state="FAILED"),
                _series("edgeprune_jobs_finished_total", "0+1x60", kind="prune", state="SUCCEEDED"),
                _series("edgeprune_queue_pending_jobs", "0+1x120", pod="api-0"),
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "EdgepruneApiErrors", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "namespace": "edgeprune"}}]},
                {"eval_time": "40m", "alertname": "EdgepruneJobsFailing", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "edgeprune"}}]},
                {"eval_time": "100m", "alertname": "EdgepruneQueueGrowing", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "edgeprune"}}]},
            ],
        },
        {   # client mistakes (NOT_FOUND) are not the server's errors
            "interval": "1m",
            "input_series": [
                _series("grpc_server_handled_total", "0+50x60", grpc_code="OK", **unary),
                _series("grpc_server_handled_total", "0+50x60", grpc_code="NOT_FOUND", **unary),
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "EdgepruneApiErrors", "exp_alerts": []}],
        },
    ]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    promtool("test", "rules", "tests.yaml", cwd=tmp_path)


def test_autoscaling_queries_count_pending_and_running_jobs(
    docs: list[dict[str, Any]], exported: set[str], tmp_path: Path
) -> None:
    """KEDA's query and prometheus-adapter's metric: pending jobs once (every API pod reports the
    same count) plus busy workers, and the pending count alone when no worker runs."""
    keda = one(docs, "ScaledObject", "edgeprune-worker")["spec"]["triggers"][0]["metadata"]["query"]
    adapter = yaml.safe_load((DEPLOY / "components" / "hpa" / "prometheus-adapter-values.yaml")
                             .read_text())["rules"]["external"][0]["metricsQuery"]
    adapter = adapter.replace("<<.LabelMatchers>>", 'namespace="edgeprune"')
    for query in (keda, adapter):
        assert metric_names(query) <= exported, query
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "scaling", "rules": [
        {"record": "keda", "expr": keda}, {"record": "adapter", "expr": adapter}]}]}))
    api_pods = [_series("edgeprune_queue_pending_jobs", "3x10", pod=p) for p in ("api-0", "api-1")]
    busy = [_series("edgeprune_workers_busy", "1x10", pod=p) for p in ("worker-0", "worker-1")]
    other_namespace = {"series": 'edgeprune_workers_busy{namespace="other",pod="w"}',
                       "values": "7x10"}

    def case(series: list[dict[str, str]], value: int) -> dict[str, Any]:
        return {"interval": "1m", "input_series": series, "promql_expr_test": [
            {"expr": name, "eval_time": "5m", "exp_samples": [{"labels": labels, "value": value}]}
            for name, labels in (("keda", "keda"), ("adapter", 'adapter{namespace="edgeprune"}'))]}

    tests = [case([*api_pods, *busy, other_namespace], 5), case([*api_pods, other_namespace], 3)]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    promtool("test", "rules", "tests.yaml", cwd=tmp_path)


def test_dashboard_reads_exported_metrics(
    docs: list[dict[str, Any]], exported: set[str], tmp_path: Path
) -> None:
    (cm,) = [d for d in find(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["edgeprune.json"])
    assert dashboard["uid"] == "edgeprune"
    exprs = {}
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            exprs[f"{panel['title']} {target['refId']}"] = target["expr"]
            assert metric_names(target["expr"]) <= exported, (panel["title"], target["expr"])
    read = set().union(*map(metric_names, exprs.values()))
    for family in ("edgeprune_queue_pending_jobs", "edgeprune_queue_oldest_pending_seconds",
                   "edgeprune_lease_expiries_total", "edgeprune_job_duration_seconds_bucket",
                   "grpc_server_handling_seconds_bucket", "grpc_server_handled_total",
                   "edgeprune_workers_busy", "edgeprune_workers"):
        assert family in read, family
    # PromQL syntax, with Grafana's variables filled in
    rules = [{"record": f"panel_{i}", "expr": expr.replace("$__rate_interval", "5m")
              .replace("$namespace", "edgeprune")} for i, expr in enumerate(exprs.values())]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    promtool("check", "rules", "rules.yaml", cwd=tmp_path)
