"""Every PromQL query the chart ships, taken from its rendered manifests (tests and benchmarks).

Sources: the KEDA ScaledObject's triggers, the prometheus-adapter rules of values.yaml (which the HPAs'
Pods metrics come from), the PrometheusRule's recording rules and alerts, and the Grafana dashboard's
panels and variables. The queries are used as rendered, with three documented substitutions:

- prometheus-adapter rules are Go templates: `<<.Series>>`, `<<.LabelMatchers>>` and `<<.GroupBy>>` are
  filled in the way the adapter fills them for the HPA's request for the pods of one namespace
  (`namespace="ns",pod=~"pod-a|pod-b"`, grouped by `pod`). Any other template construct is an error.
- Grafana variables: `$namespace`, `$gateway`, `$worker` take the values the chart rendered as their
  defaults (this release), and `$__rate_interval` a fixed window (Grafana derives it from the scrape
  interval and the panel's resolution).
- An alert's "inner" expression is its expression without the threshold comparison (`> 0.05`,
  `>= 51.2`) and the guards after it (`and on () <traffic> >= 0.05`), so that it returns series whether or
  not the alert would fire.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_DIR = Path(__file__).resolve().parents[2]
METRICS_DOC = REPO_DIR / "docs" / "metrics.md"
_GUARD = re.compile(r"\b(?:and|unless)\s+on\s*\(")
_THRESHOLD = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*(bool\s+)?[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_ADAPTER_TEMPLATE = re.compile(r"<<\s*(.*?)\s*>>")
_VARIABLE = re.compile(r"\$(\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Query:
    source: str  # where the query comes from, e.g. "keda trigger in-flight", "dashboard panel Tokens/s (A)"
    expr: str


# -- autoscaling ----------------------------------------------------------------------------------------


def keda_triggers(rendered) -> list[dict]:
    """[{"name", "query", "threshold"}] of the ScaledObject's Prometheus triggers."""
    (scaled,) = rendered.all("ScaledObject")
    return [
        {"name": t["name"], "query": t["metadata"]["query"], "threshold": float(t["metadata"]["threshold"])}
        for t in scaled["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]


def adapter_rules(values_file: Path) -> list[dict]:
    return yaml.safe_load(values_file.read_text())["prometheusAdapter"]["rules"]


def adapter_series_name(rule: dict) -> str:
    """The metric a rule serves (its seriesQuery's metric name; the rules keep the name as is)."""
    match = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
    assert match, rule["seriesQuery"]
    assert rule["name"] == {"matches": "^(.*)$", "as": "${1}"}, rule["name"]
    return match[1]


def adapter_query(rule: dict, namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter runs for an HPA asking for this metric of these pods."""
    fill = {
        ".Series": adapter_series_name(rule),
        ".LabelMatchers": f'namespace="{namespace}",pod=~"{"|".join(pods)}"',
        ".GroupBy": "pod",
    }

    def substitute(match: re.Match) -> str:
        if match[1] not in fill:
            raise ValueError(f"prometheus-adapter template {match[0]} is not supported by this test helper")
        return fill[match[1]]

    return _ADAPTER_TEMPLATE.sub(substitute, rule["metricsQuery"])


def hpa_spec(rendered, name: str) -> dict:
    """The HPA's bounds, Pods metrics (name -> target average value) and behavior (Resource metrics, such
    as the gateway's CPU, come from the metrics server, not Prometheus: left out)."""
    hpa = rendered.one("HorizontalPodAutoscaler", name)["spec"]
    metrics = {}
    for metric in hpa["metrics"]:
        if metric["type"] == "Resource":
            continue
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue", metric
        metrics[metric["pods"]["metric"]["name"]] = float(metric["pods"]["target"]["averageValue"])
    return {
        "minReplicas": hpa["minReplicas"],
        "maxReplicas": hpa["maxReplicas"],
        "metrics": metrics,
        "behavior": hpa["behavior"],
    }


# -- rules ------------------------------------------------------------------------------------------------


def rule_groups(rendered) -> dict:
    (rule,) = rendered.all("PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def recording_rules(groups: dict) -> list[Query]:
    return [Query(r["record"], r["expr"]) for g in groups["groups"] for r in g["rules"] if "record" in r]


def alerts(groups: dict) -> list[Query]:
    return [Query(r["alert"], r["expr"]) for g in groups["groups"] for r in g["rules"] if "alert" in r]


def alert_inner(expr: str) -> str:
    """The alert's expression without its threshold comparison and without the guards after it
    (``<expr> > 0.05 and on () <traffic> >= 0.05 unless on () <scaled to zero>``: guards only gate when
    the alert may fire): cut at the first top-level ``and on``/``unless on`` that follows a threshold."""
    expr = expr.strip()
    for guard in _GUARD.finditer(expr):
        head = expr[: guard.start()].rstrip()
        if _top_level(head) and _THRESHOLD.search(head):
            expr = head
            break
    return _THRESHOLD.sub("", expr)


def _top_level(text: str) -> bool:
    """True when every parenthesis and brace opened in ``text`` is closed (the cut is at the top level)."""
    return text.count("(") == text.count(")") and text.count("{") == text.count("}")


# -- dashboard --------------------------------------------------------------------------------------------


def dashboard(rendered) -> dict:
    (config_map,) = [d for d in rendered.all("ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    (text,) = config_map["data"].values()
    return json.loads(text)


def dashboard_variables(board: dict) -> dict[str, str]:
    """Query variables and the value the chart rendered as their default."""
    return {
        v["name"]: v["current"]["value"]
        for v in board["templating"]["list"]
        if v["type"] == "query" and v.get("current")
    }


def substitute_variables(expr: str, variables: dict[str, str], rate_interval: str) -> str:
    values = {**variables, "__rate_interval": rate_interval}

    def fill(match: re.Match) -> str:
        name = match[2] or match[3]
        if name not in values:
            raise ValueError(f"unknown dashboard variable ${name} in {expr}")
        return values[name]

    return _VARIABLE.sub(fill, expr)


def panels(board: dict) -> list[dict]:
    """Every panel with targets (rows' nested panels included)."""
    out = []
    for panel in board["panels"]:
        out.extend(panel.get("panels", []))
        if panel.get("targets"):
            out.append(panel)
    return out


def dashboard_queries(board: dict, rate_interval: str = "5m") -> list[tuple[dict, dict, str]]:
    """(panel, target, expr with variables filled) for every target of every panel."""
    variables = dashboard_variables(board)
    return [
        (panel, target, substitute_variables(target["expr"], variables, rate_interval))
        for panel in panels(board)
        for target in panel["targets"]
    ]


def variable_queries(board: dict) -> list[tuple[str, str, str]]:
    """(variable, series selector, label) of every `label_values(selector, label)` variable, filled."""
    variables = dashboard_variables(board)
    out = []
    for v in board["templating"]["list"]:
        if v["type"] != "query":
            continue
        definition = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", definition.strip())
        assert match, f"variable {v['name']}: unsupported query {definition}"
        out.append((v["name"], substitute_variables(match[1], variables, "5m"), match[2]))
    return out


# -- the metrics contract ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContractMetric:
    name: str
    type: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    unit: str
    meaning: str

    @property
    def cuda_only(self) -> bool:
        return self.meaning.lower().startswith("cuda only")


def metrics_contract(path: Path = METRICS_DOC) -> list[ContractMetric]:
    """The metric tables of docs/metrics.md (columns name, type, labels, unit, meaning)."""
    rows: list[ContractMetric] = []
    header: list[str] | None = None
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the separator row
        if header[:2] != ["name", "type"]:
            continue
        row = dict(zip(header, cells, strict=False))
        labels = tuple(x.strip(" `") for x in row.get("labels", "-").split(",") if x.strip(" `-"))
        rows.append(
            ContractMetric(
                row["name"].strip("`"), row["type"], labels, row.get("unit", ""), row.get("meaning", "")
            )
        )
    return rows


def metric_names(expr: str) -> set[str]:
    """The Omnigate metric names an expression uses (histogram suffixes removed)."""
    names = set(re.findall(r"\bomnigate_(?:gateway|worker)_[a-z0-9_]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
