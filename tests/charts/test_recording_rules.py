"""The PrometheusRule's recording rules: named level:metric:operations after what they keep and compute, over
contract metrics of this release, and computing the right numbers (promtool on synthetic series)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.charts.chart import GATEWAY, NAMESPACE, WORKER, render
from tests.support import chart_queries

ENABLED = {"metrics.prometheusRule.enabled": "true"}


def _recording(set_values=None) -> list[chart_queries.Query]:
    return chart_queries.recording_rules(
        chart_queries.rule_groups(render(set_values={**ENABLED, **(set_values or {})}))
    )


def test_recording_rules_can_be_turned_off():
    assert len(_recording()) >= 10
    assert _recording({"metrics.prometheusRule.recordingRules.enabled": "false"}) == []
    groups = chart_queries.rule_groups(
        render(set_values={**ENABLED, "metrics.prometheusRule.recordingRules.enabled": "false"})
    )
    assert len(chart_queries.alerts(groups)) == 6


def test_names_say_which_labels_are_kept_which_metric_and_which_operations():
    contract = {m.name for m in chart_queries.metrics_contract()}
    for rule in _recording():
        level, metric, operations = rule.source.split(":")
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", level) and re.fullmatch(r"[a-z0-9_]+", operations), (
            rule.source
        )
        # The level lists the labels the result keeps, in the order of the `by` clause (le aside).
        kept = re.findall(r"\bby \(([^)]*)\)", rule.expr)
        assert kept, rule.expr
        for clause in kept:
            labels = [x.strip() for x in clause.split(",") if x.strip() != "le"]
            assert "_".join(labels) == level, f"{rule.source}: by ({clause})"
        # The metric part is the exported metric (counters without _total), which is in the contract.
        used = chart_queries.metric_names(rule.expr)
        assert used <= contract, used - contract
        derived = {re.sub(r"_total$", "", n) for n in used}
        if "omnigate_gateway_requests" in derived:  # a ratio of some requests to all requests
            derived.add("omnigate_gateway_server_errors_per_requests")
        assert metric in derived, rule.source
        if "rate(" in rule.expr:
            assert "rate5m" in operations and "[5m]" in rule.expr, rule.source


def test_recording_rules_select_only_this_release():
    for rule in _recording():
        for metric, selector in re.findall(r"\b(omnigate_(?:gateway|worker)_\w+)\{([^}]*)\}", rule.expr):
            job = GATEWAY if metric.startswith("omnigate_gateway_") else WORKER
            assert selector.startswith(f'namespace="{NAMESPACE}",job="{job}"'), f"{rule.source}: {selector}"


def test_error_ratio_uses_the_alerts_server_side_codes():
    (ratio,) = [
        r
        for r in _recording(
            {
                "metrics.prometheusRule.errorRate.codes": "INTERNAL|UNAVAILABLE",
                "metrics.prometheusRule.errorRate.coldStartCodes": "",
            }
        )
        if "server_errors" in r.source
    ]
    assert 'code=~"INTERNAL|UNAVAILABLE"' in ratio.expr
    # By default: the codes always counted and those the alert counts only with ready workers, all of them.
    (ratio,) = [r for r in _recording() if "server_errors" in r.source]
    assert 'code=~"INTERNAL|UNKNOWN|DEADLINE_EXCEEDED|DATA_LOSS|UNAVAILABLE"' in ratio.expr


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (Debian package `prometheus`)"
)
def test_recording_rules_compute_sums_rates_ratios_and_quantiles(tmp_path):
    """promtool test rules: the recorded series on synthetic input from two pods of this release and one of
    another release (which must not count)."""
    groups = chart_queries.rule_groups(render(set_values=ENABLED))
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    gw = f'namespace="{NAMESPACE}",job="{GATEWAY}"'
    wk = f'namespace="{NAMESPACE}",job="{WORKER}"'
    other = 'namespace="other",job="x-omnigate-worker",pod="x-1"'
    series = [
        (f'omnigate_worker_in_flight_requests{{{wk},pod="w-1"}}', "3x20"),
        (f'omnigate_worker_in_flight_requests{{{wk},pod="w-2"}}', "5x20"),
        (f"omnigate_worker_in_flight_requests{{{other}}}", "100x20"),
        (f'omnigate_worker_queue_depth{{{wk},pod="w-1"}}', "2x20"),
        (f'omnigate_worker_queue_depth{{{wk},pod="w-2"}}', "0x20"),
        # 3 OK and 1 UNAVAILABLE Generate request per second, 1 INVALID_ARGUMENT (a client error).
        (
            f'omnigate_gateway_requests_total{{{gw},pod="g-1",rpc="Generate",code="OK",mode="text"}}',
            "0+180x20",
        ),
        (
            f'omnigate_gateway_requests_total{{{gw},pod="g-1",rpc="Generate",code="UNAVAILABLE",mode="text"}}',
            "0+60x20",
        ),
        (
            f'omnigate_gateway_requests_total{{{gw},pod="g-2",rpc="Generate",code="INVALID_ARGUMENT",mode="unknown"}}',
            "0+60x20",
        ),
        (f'omnigate_worker_generated_tokens_total{{{wk},pod="w-1"}}', "0+600x20"),
        (f'omnigate_worker_generated_tokens_total{{{wk},pod="w-2"}}', "0+1200x20"),
        # Every text TTFT in the (0.25, 0.5] bucket: p50 and p95 fall inside it.
        *[
            (
                f'omnigate_gateway_time_to_first_token_seconds_bucket{{{gw},pod="g-1",mode="text",le="{le}"}}',
                values,
            )
            for le, values in (("0.25", "0x20"), ("0.5", "0+60x20"), ("1", "0+60x20"), ("+Inf", "0+60x20"))
        ],
        # Batches of 4 rows: 10 steps per second.
        (f'omnigate_worker_batch_size_sum{{{wk},pod="w-1"}}', "0+2400x20"),
        (f'omnigate_worker_batch_size_count{{{wk},pod="w-1"}}', "0+600x20"),
    ]
    exp = {
        "namespace_job:omnigate_worker_in_flight_requests:sum": 8,
        "namespace_job:omnigate_worker_queue_depth:sum": 2,
        "namespace_job:omnigate_worker_generated_tokens:rate5m": 30,
        "namespace_job:omnigate_gateway_server_errors_per_requests:ratio_rate5m": 0.2,
        "namespace_job:omnigate_worker_batch_size:mean_rate5m": 4,
        'namespace_job_mode:omnigate_gateway_time_to_first_token_seconds:p50_rate5m{mode="text"}': 0.375,
        'namespace_job_mode:omnigate_gateway_time_to_first_token_seconds:p95_rate5m{mode="text"}': 0.4875,
    }
    tests = []
    for key, value in exp.items():
        name, _, extra = key.partition("{")
        job = GATEWAY if "gateway" in name else WORKER
        labels = f'{name}{{namespace="{NAMESPACE}",job="{job}"{"," + extra.rstrip("}") if extra else ""}}}'
        tests.append({"expr": name, "eval_time": "10m", "exp_samples": [{"labels": labels, "value": value}]})
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": tests,
            },
            {
                # No failures at all: the error ratio is 0, not missing.
                "interval": "1m",
                "input_series": [{"series": series[5][0], "values": "0+60x20"}],
                "promql_expr_test": [
                    {
                        "expr": "namespace_job:omnigate_gateway_server_errors_per_requests:ratio_rate5m",
                        "eval_time": "10m",
                        "exp_samples": [
                            {
                                "labels": f'namespace_job:omnigate_gateway_server_errors_per_requests:ratio_rate5m{{namespace="{NAMESPACE}",job="{GATEWAY}"}}',
                                "value": 0,
                            }
                        ],
                    }
                ],
            },
        ],
    }
    (tmp_path / "recording_test.yaml").write_text(json.dumps(test))
    result = subprocess.run(
        ["promtool", "test", "rules", "recording_test.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
