"""Every alert links to its runbook, a section of the operator guide, and its windows respect start-up."""

from __future__ import annotations

import re

import pytest

from tests.charts.chart import REPO_DIR, WORKER, helm, render, render_profile, template_args

GUIDE = REPO_DIR / "docs" / "operator-guide.md"


def _alerts(rendered) -> dict:
    (rule,) = rendered.all("PrometheusRule")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}


def _guide_anchors() -> set[str]:
    """GitHub's anchors of the guide's headings (lower case, punctuation dropped, spaces to dashes)."""
    headings = re.findall(r"^#{1,6} (.+)$", GUIDE.read_text(), re.M)
    return {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("profile", ["gpu-prod", "keda"])
def test_every_alert_links_to_its_section_of_the_operator_guide_by_default(profile):
    alerts = _alerts(render_profile(profile))
    anchors = _guide_anchors()
    for name, alert in alerts.items():
        url = alert["annotations"]["runbook_url"]
        base, anchor = url.split("#")
        assert base == "https://github.com/omnigate/omnigate/blob/main/docs/operator-guide.md"
        assert anchor == name.lower()
        assert anchor in anchors, f"docs/operator-guide.md has no section for {name}"


def test_runbook_links_follow_runbook_url_and_can_be_turned_off():
    values = {"metrics.prometheusRule.enabled": "true"}
    own = _alerts(
        render(set_values={**values, "metrics.prometheusRule.runbookUrl": "https://wiki.example/og"})
    )
    assert (
        own["OmnigateNoReadyWorkers"]["annotations"]["runbook_url"]
        == "https://wiki.example/og#omnigatenoreadyworkers"
    )
    off = _alerts(render(set_values={**values, "metrics.prometheusRule.runbookUrl": ""}))
    assert all("runbook_url" not in a["annotations"] for a in off.values())


def test_no_ready_workers_waits_longer_than_the_startup_budget():
    alerts = _alerts(render_profile("gpu-prod"))
    worker = render_profile("gpu-prod").one("Deployment", WORKER)
    assert alerts["OmnigateNoReadyWorkers"]["for"] == f"{worker['spec']['progressDeadlineSeconds'] // 60}m"
    longer = _alerts(
        render(
            set_values={"metrics.prometheusRule.enabled": "true", "worker.startupProbe.failureThreshold": 360}
        )
    )
    assert longer["OmnigateNoReadyWorkers"]["for"] == "70m"  # 60 min of probe + 10 min margin
    explicit = _alerts(
        render(
            set_values={
                "metrics.prometheusRule.enabled": "true",
                "metrics.prometheusRule.noReadyWorkers.for": "1h",
            }
        )
    )
    assert explicit["OmnigateNoReadyWorkers"]["for"] == "1h"


@pytest.mark.parametrize("duration", ["10m", "29m59s", "1800s"])
def test_a_no_ready_workers_window_inside_the_startup_allowance_is_refused(duration):
    values = {"metrics.prometheusRule.enabled": "true", "metrics.prometheusRule.noReadyWorkers.for": duration}
    result = helm(*template_args(set_values=values), check=False)
    assert result.returncode != 0
    assert f"metrics.prometheusRule.noReadyWorkers.for ({duration}) is not longer than" in result.stderr


def test_error_rate_alert_has_a_traffic_guard_and_counts_unavailable_only_with_ready_workers():
    expr = _alerts(render_profile("keda"))["OmnigateGatewayHighErrorRate"]["expr"]
    assert ">= 0.05" in expr  # minRequestsPerSecond
    assert 'code=~"INTERNAL|UNKNOWN|DEADLINE_EXCEEDED|DATA_LOSS"' in expr
    assert 'code=~"UNAVAILABLE"' in expr and 'state="ready"' in expr


def test_autoscaler_alert_exists_only_with_an_autoscaler():
    values = {"metrics.prometheusRule.enabled": "true"}
    assert "OmnigateAutoscalerMetricsUnavailable" not in _alerts(render(set_values=values))
    expr = _alerts(render_profile("gpu-prod"))["OmnigateAutoscalerMetricsUnavailable"]["expr"]
    assert 'horizontalpodautoscaler=~"og-omnigate-gateway|og-omnigate-worker"' in expr
    assert 'condition="ScalingActive",status="false"' in expr
