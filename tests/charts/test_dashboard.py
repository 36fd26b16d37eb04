"""The Grafana dashboard ConfigMap: rendered for the sidecar, and a dashboard whose every query is valid PromQL
over the metrics contract, selecting this release. tests/integration/test_prometheus.py runs the queries."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.charts.chart import CHART_DIR, GATEWAY, KUBERNETES_VERSIONS, NAMESPACE, WORKER, helm, render
from tests.support import chart_queries

ENABLED = {"metrics.grafanaDashboard.enabled": "true"}
DASHBOARD_FILE = CHART_DIR / "dashboards" / "omnigate.json"
CONFIG_MAP = "og-omnigate-dashboard"


def _config_map(set_values=None, **kwargs) -> dict:
    rendered = render(set_values={**ENABLED, **(set_values or {})}, **kwargs)
    (config_map,) = [d for d in rendered.all("ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    return config_map


def _board(set_values=None, **kwargs) -> dict:
    (text,) = _config_map(set_values, **kwargs)["data"].values()
    return json.loads(text)


def test_no_dashboard_unless_enabled():
    assert render().maybe("ConfigMap", CONFIG_MAP) is None


def test_config_map_is_labelled_for_the_grafana_sidecar():
    config_map = _config_map()
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"  # kube-prometheus-stack's default
    assert config_map["metadata"]["labels"]["app.kubernetes.io/instance"] == "og"
    assert list(config_map["data"]) == ["omnigate.json"]
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(config_map, version, strict=True)


def test_sidecar_label_namespace_and_folder_are_configurable():
    config_map = _config_map(
        {
            "metrics.grafanaDashboard.label": "example.com/dashboard",
            "metrics.grafanaDashboard.labelValue": "omnigate",
            "metrics.grafanaDashboard.namespace": "monitoring",
            "metrics.grafanaDashboard.annotations": {"grafana_folder": "Serving"},
            "metrics.grafanaDashboard.labels": {"team": "ml"},
            "commonAnnotations": {"owner": "platform"},
        }
    )
    meta = config_map["metadata"]
    assert meta["labels"]["example.com/dashboard"] == "omnigate"
    assert "grafana_dashboard" not in meta["labels"]
    assert meta["labels"]["team"] == "ml"
    assert meta["namespace"] == "monitoring"
    assert meta["annotations"] == {"grafana_folder": "Serving", "owner": "platform"}


def test_dashboard_is_the_shipped_json_opening_on_this_release():
    shipped = json.loads(DASHBOARD_FILE.read_text())
    board = _board()
    assert board["panels"] == shipped["panels"]
    assert chart_queries.dashboard_variables(board) == {
        "namespace": NAMESPACE,
        "gateway": GATEWAY,
        "worker": WORKER,
    }
    assert NAMESPACE in board["title"] and "og-omnigate" in board["title"]
    other = _board(release="other", namespace="prod")
    assert chart_queries.dashboard_variables(other) == {
        "namespace": "prod",
        "gateway": "other-omnigate-gateway",
        "worker": "other-omnigate-worker",
    }
    # Two releases give two dashboards (Grafana keys dashboards by uid, at most 40 characters).
    assert board["uid"] != other["uid"] and len(board["uid"]) <= 40 and len(other["uid"]) <= 40


def test_variables_default_to_the_jobs_the_monitors_set():
    """The dashboard's job variables are the Service names, which the Service/PodMonitors set as `job`."""
    rendered = render(set_values={**ENABLED, "metrics.serviceMonitor.enabled": "true"})
    board = chart_queries.dashboard(rendered)
    variables = chart_queries.dashboard_variables(board)
    monitors = {m["metadata"]["name"] for m in rendered.all("ServiceMonitor")}
    assert {variables["gateway"], variables["worker"]} == monitors
    selectors = {name: selector for name, selector, _label in chart_queries.variable_queries(board)}
    assert selectors["gateway"].startswith("omnigate_gateway_")
    assert selectors["worker"].startswith("omnigate_worker_")


def test_panels_are_laid_out_on_the_grid_with_unique_ids():
    board = json.loads(DASHBOARD_FILE.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_panel_queries_the_chosen_data_source_with_distinct_ref_ids():
    board = json.loads(DASHBOARD_FILE.read_text())
    source = board["templating"]["list"][0]
    assert (source["name"], source["type"], source["query"]) == ("datasource", "datasource", "prometheus")
    for panel in chart_queries.panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["description"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]


def test_queries_use_contract_metrics_and_select_this_release_per_component():
    board = json.loads(DASHBOARD_FILE.read_text())
    contract = {m.name: m for m in chart_queries.metrics_contract()}
    used = set()
    for panel in chart_queries.panels(board):
        for target in panel["targets"]:
            expr = target["expr"]
            names = chart_queries.metric_names(expr)
            assert names, f"{panel['title']}: no Omnigate metric in {expr}"
            assert names <= set(contract), f"{panel['title']}: {names - set(contract)} not in docs/metrics.md"
            used |= names
            # Every selector pins the namespace and the job of its own component.
            for metric, selector in re.findall(r"\b(omnigate_(?:gateway|worker)_\w+)\{([^}]*)\}", expr):
                component = "gateway" if metric.startswith("omnigate_gateway_") else "worker"
                assert 'namespace="$namespace"' in selector, f"{panel['title']}: {metric}{{{selector}}}"
                assert f'job="${component}"' in selector, f"{panel['title']}: {metric}{{{selector}}}"
            assert not re.search(r"\bomnigate_\w+(?![\w{])", expr), f"a metric without a selector in {expr}"
    # What the issue asks the dashboard to show.
    wanted = {
        "throughput": "omnigate_gateway_requests_total",
        "tokens": "omnigate_worker_generated_tokens_total",
        "latency quantiles": "omnigate_gateway_request_duration_seconds",
        "TTFT": "omnigate_gateway_time_to_first_token_seconds",
        "time to first audio": "omnigate_gateway_time_to_first_audio_seconds",
        "queue depth": "omnigate_worker_queue_depth",
        "batch size": "omnigate_worker_batch_size",
        "errors": "omnigate_gateway_rejected_requests_total",
        "media fetch": "omnigate_gateway_media_fetch_duration_seconds",
    }
    missing = {topic: name for topic, name in wanted.items() if name not in used}
    assert not missing, missing


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (Debian package `prometheus`)"
)
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query (variables filled), as the expression of a recording rule."""
    board = _board()
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": expr}
        for i, (_panel, _target, expr) in enumerate(chart_queries.dashboard_queries(board))
    ]
    for i, (_name, selector, _label) in enumerate(chart_queries.variable_queries(board)):
        rules.append({"record": f"dashboard:variable_{i}:check", "expr": selector})
    (tmp_path / "queries.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = subprocess.run(
        ["promtool", "check", "rules", "queries.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_unknown_dashboard_keys_are_refused(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"metrics": {"grafanaDashboard": {"enabled": True, "folder": "x"}}}))
    result = helm("template", "og", str(CHART_DIR), "-f", str(values), check=False)
    assert result.returncode != 0
    assert "additional properties 'folder' not allowed" in result.stderr


def test_lint_passes_with_the_dashboard():
    result = helm(
        "lint", "--strict", str(CHART_DIR), "--set", "metrics.grafanaDashboard.enabled=true", check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
