"""The chart's PrometheusRule passes `promtool check rules`, each alert fires on trouble and only then, and
the windows that keep cold starts quiet follow the workers' start-up budget and the gateway's wait."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.charts.chart import (
    GATEWAY,
    NAMESPACE,
    TESTS_DIR,
    WORKER,
    helm,
    render,
    render_profile,
    template_args,
)

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package `prometheus`; `make test` installs it: .ci/system-tools)",
)


def _rule_groups(rendered) -> dict:
    (rule,) = rendered.all("PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def _promtool(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@needs_promtool
@pytest.mark.parametrize("profile", ["gpu-prod", "keda"])
def test_promtool_check_rules_passes(profile, tmp_path):
    groups = _rule_groups(render_profile(profile))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    result = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = [r for g in groups["groups"] for r in g["rules"] if "alert" in r]
    # Both profiles autoscale, so the autoscaler-metrics alert is rendered next to the six others.
    assert len(alerts) == 7
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups['groups'])} rules found" in result.stdout


@needs_promtool
def test_promtool_check_rules_catches_a_broken_expression(tmp_path):
    groups = _rule_groups(render_profile("gpu-prod"))
    groups["groups"][0]["rules"][0]["expr"] += " +"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    assert _promtool("check", "rules", "rules.yaml", cwd=tmp_path).returncode != 0


UNIT_TEST_VALUES = {
    "metrics.prometheusRule.enabled": "true",
    "gateway.autoscaling.enabled": "true",
    "worker.autoscaling.enabled": "true",
}


def _write_unit_test_rules(tmp_path, set_values=None, rendered=None, test_file="alerts_test.yaml") -> None:
    rendered = rendered or render(set_values={**UNIT_TEST_VALUES, **(set_values or {})})
    groups = copy.deepcopy(_rule_groups(rendered))  # render_profile's objects are shared between tests
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    shutil.copy(TESTS_DIR / "promtool" / test_file, tmp_path / test_file)


@needs_promtool
def test_each_alert_fires_on_trouble_and_stays_quiet_when_healthy(tmp_path):
    _write_unit_test_rules(tmp_path)
    result = _promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_scale_to_zero_pages_nobody_and_a_blind_keda_hpa_and_a_failed_wake_up_do(tmp_path):
    _write_unit_test_rules(tmp_path, rendered=render_profile("keda"), test_file="keda_alerts_test.yaml")
    result = _promtool("test", "rules", "keda_alerts_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("values", "alert"),
    [
        # Without the traffic guard a trickle of failures pages.
        ({"metrics.prometheusRule.errorRate.minRequestsPerSecond": 0}, "OmnigateGatewayHighErrorRate"),
        # Counting UNAVAILABLE always pages on every cold start.
        ({"metrics.prometheusRule.errorRate.codes": "INTERNAL|UNAVAILABLE"}, "OmnigateGatewayHighErrorRate"),
        # A NoReadyWorkers window inside the start-up budget fires while a model is still loading.
        ({"metrics.prometheusRule.noReadyWorkers.for": "31m"}, "OmnigateNoReadyWorkers"),
        # Without the per-mode traffic guard a handful of slow audio requests pages.
        ({"metrics.prometheusRule.latency.minRequestsPerSecond": 0}, "OmnigateTimeToFirstOutputSLO"),
        # A ready window without the gateway's wait for a worker pages on the requests held through a cold start.
        ({"gateway.config.wait_for_worker_s": 0}, "OmnigateTimeToFirstOutputSLO"),
        # A lookback shorter than NoReadyWorkers' window leaves a lasting outage unpaged in between.
        ({"metrics.prometheusRule.workersLost.lookback": "30m"}, "OmnigateWorkersLost"),
        # A demand window inside the start-up budget fires while clients wait for a first model load.
        ({"metrics.prometheusRule.demandWithoutWorkers.for": "31m"}, "OmnigateDemandWithoutWorkers"),
    ],
)
@needs_promtool
def test_the_new_guards_are_what_keeps_the_alerts_quiet(tmp_path, values, alert):
    _write_unit_test_rules(tmp_path, values)
    result = _promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr


@needs_promtool
def test_the_alert_unit_tests_can_fail(tmp_path):
    """With a far higher error threshold the error-rate alert no longer fires and the unit tests say so."""
    _write_unit_test_rules(tmp_path, {"metrics.prometheusRule.errorRate.threshold": 0.5})
    result = _promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "OmnigateGatewayHighErrorRate" in result.stdout + result.stderr


@needs_promtool
def test_autoscaling_queries_select_this_releases_series(tmp_path):
    """The KEDA triggers' queries, evaluated by promtool on synthetic series of two releases."""
    (scaled,) = render_profile("keda").all("ScaledObject")
    queries = {t["name"]: t["metadata"]["query"] for t in scaled["spec"]["triggers"]}
    other = 'namespace="other",job="x-omnigate-worker",pod="x-1"'
    worker = f'namespace="{NAMESPACE}",job="{WORKER}"'
    gateway = f'namespace="{NAMESPACE}",job="{GATEWAY}"'
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f'omnigate_worker_in_flight_requests{{{worker},pod="w-1"}}', "values": "3x10"},
                    {"series": f'omnigate_worker_in_flight_requests{{{worker},pod="w-2"}}', "values": "5x10"},
                    {"series": f"omnigate_worker_in_flight_requests{{{other}}}", "values": "100x10"},
                    {"series": f'omnigate_worker_queue_depth{{{worker},pod="w-1"}}', "values": "1x10"},
                    {"series": f'omnigate_worker_queue_depth{{{worker},pod="w-2"}}', "values": "2x10"},
                    {"series": f"omnigate_worker_queue_depth{{{other}}}", "values": "50x10"},
                    # Two gateways hold 2 and 1 admitted requests; refused traffic (counted only in
                    # omnigate_gateway_requests_total) and another release's gateway are not demand.
                    {
                        "series": f'omnigate_gateway_admitted_requests{{{gateway},pod="g-1"}}',
                        "values": "0 2x10",
                    },
                    {
                        "series": f'omnigate_gateway_admitted_requests{{{gateway},pod="g-2"}}',
                        "values": "1x10",
                    },
                    {
                        "series": 'omnigate_gateway_admitted_requests{namespace="other",job="x-omnigate-gateway"}',
                        "values": "40x10",
                    },
                    {
                        "series": f'omnigate_gateway_requests_total{{{gateway},pod="g-1",rpc="Generate",code="UNAUTHENTICATED",mode="unknown"}}',
                        "values": "0+600x10",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": queries["in-flight"],
                        "eval_time": "5m",
                        "exp_samples": [{"labels": "{}", "value": 8}],
                    },
                    {
                        "expr": queries["queue-depth"],
                        "eval_time": "5m",
                        "exp_samples": [{"labels": "{}", "value": 3}],
                    },
                    {
                        "expr": queries["gateway-demand"],
                        "eval_time": "5m",
                        "exp_samples": [{"labels": "{}", "value": 3}],
                    },
                ],
            }
        ],
    }
    (tmp_path / "queries_test.yaml").write_text(json.dumps(test))
    result = _promtool("test", "rules", "queries_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- windows (rendered, no promtool) -------------------------------------------------------------------------

ENABLED = {"metrics.prometheusRule.enabled": "true"}


def _alerts(rendered) -> dict:
    (rule,) = rendered.all("PrometheusRule")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}


def _minutes(duration: str) -> int:
    match = re.fullmatch(r"(\d+)([mh])", duration)
    assert match, duration
    return int(match[1]) * (60 if match[2] == "h" else 1)


def _lookback(alert: dict) -> str:
    (window,) = set(re.findall(r"\[(\w+)\]", alert["expr"]))  # max_over_time and min_over_time share it
    return window


@pytest.mark.parametrize("profile", ["gpu-prod", "keda"])
def test_the_outage_alerts_windows_follow_the_no_ready_workers_window(profile):
    """Clients waiting without workers page after the start-up budget; a lost fleet pages fast, and for 20
    minutes longer than OmnigateNoReadyWorkers waits, so a lasting outage is never left unpaged."""
    alerts = _alerts(render_profile(profile))
    budget = alerts["OmnigateNoReadyWorkers"]["for"]
    assert alerts["OmnigateDemandWithoutWorkers"]["for"] == budget
    assert alerts["OmnigateWorkersLost"]["for"] == "5m"
    assert _minutes(_lookback(alerts["OmnigateWorkersLost"])) == _minutes(budget) + 20
    # The fast path stays quiet when the workers were scaled to zero within the same lookback.
    assert (
        f'kube_deployment_spec_replicas{{namespace="{NAMESPACE}",deployment="{WORKER}"}}'
        in (alerts["OmnigateWorkersLost"]["expr"])
    )


def test_the_outage_alerts_windows_can_be_set():
    alerts = _alerts(
        render(
            set_values={
                **ENABLED,
                "metrics.prometheusRule.noReadyWorkers.for": "1h",
                "metrics.prometheusRule.demandWithoutWorkers.demandWindow": "15m",
            }
        )
    )
    assert alerts["OmnigateDemandWithoutWorkers"]["for"] == "1h"
    assert "admitted_requests{" in alerts["OmnigateDemandWithoutWorkers"]["expr"]
    assert "[15m]" in alerts["OmnigateDemandWithoutWorkers"]["expr"]
    assert _lookback(alerts["OmnigateWorkersLost"]) == "80m"
    own = _alerts(
        render(
            set_values={
                **ENABLED,
                "metrics.prometheusRule.workersLost.lookback": "2h",
                "metrics.prometheusRule.demandWithoutWorkers.for": "45m",
            }
        )
    )
    assert _lookback(own["OmnigateWorkersLost"]) == "2h"
    assert own["OmnigateDemandWithoutWorkers"]["for"] == "45m"


@pytest.mark.parametrize("duration", ["10m", "30m", "1800s"])
def test_a_demand_window_inside_the_startup_allowance_is_refused(duration):
    values = {**ENABLED, "metrics.prometheusRule.demandWithoutWorkers.for": duration}
    result = helm(*template_args(set_values=values), check=False)
    assert result.returncode != 0
    assert f"metrics.prometheusRule.demandWithoutWorkers.for ({duration}) is not longer than" in result.stderr


@pytest.mark.parametrize(
    ("wait_for_worker_s", "window"), [(None, "10m"), (0, "5m"), (600, "15m"), (12.5, "6m")]
)
def test_the_latency_alert_counts_once_workers_outlast_the_gateways_wait(wait_for_worker_s, window):
    """Ready for the 5-minute rate window plus the longest a request waits at a gateway for a worker."""
    values = dict(ENABLED)
    if wait_for_worker_s is not None:
        values["gateway.config.wait_for_worker_s"] = wait_for_worker_s
    expr = _alerts(render(set_values=values))["OmnigateTimeToFirstOutputSLO"]["expr"]
    assert f'state="ready"}})[{window}:]) > 0' in expr
    assert "_count{" in expr and ">= 0.05" in expr  # latency.minRequestsPerSecond, per mode


def test_each_outage_alert_can_be_turned_off():
    values = {
        **ENABLED,
        "metrics.prometheusRule.workersLost.enabled": "false",
        "metrics.prometheusRule.demandWithoutWorkers.enabled": "false",
    }
    alerts = _alerts(render(set_values=values))
    assert "OmnigateWorkersLost" not in alerts and "OmnigateDemandWithoutWorkers" not in alerts
    assert "OmnigateNoReadyWorkers" in alerts
