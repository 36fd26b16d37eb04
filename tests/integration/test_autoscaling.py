"""Autoscaling: the HPA algorithm of bench/autoscale.py (unit tests), and a simulation against the real stack
(load steps idle -> high -> idle, the chart's autoscaling queries read from a real Prometheus, the HPA
applied with the chart's targets and behavior).

The simulation computes the worker count the HPA would ask for; one worker really runs. The chart's
scale-down stabilization is 600 s and its scale-down policy one pod per 120 s: the test renders the chart
with every duration of the behavior divided by TIME_SCALE (stabilization 20 s, one pod per 4 s, scale-up
periods 1 s) so that it ends in about a minute, and syncs every 2 s instead of 15 s. It writes
bench/results/autoscale-test.{json,png}; `make bench-autoscale` runs the chart's own durations.
"""

from __future__ import annotations

import pytest

from bench import autoscale
from tests.charts.chart import missing_tools_reason
from tests.support.prometheus_server import prometheus_binary

TIME_SCALE = 30
SYNC_PERIOD_S = 2.0
CONCURRENCY = 24

# The worker HPA's default behavior (values.yaml), as the HPA reads it.
CHART_BEHAVIOR = {
    "scaleUp": {
        "stabilizationWindowSeconds": 0,
        "selectPolicy": "Max",
        "policies": [
            {"type": "Percent", "value": 100, "periodSeconds": 30},
            {"type": "Pods", "value": 2, "periodSeconds": 30},
        ],
    },
    "scaleDown": {
        "stabilizationWindowSeconds": 600,
        "selectPolicy": "Min",
        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
    },
}


def _run(steps, behavior=CHART_BEHAVIOR, target=8.0, min_r=1, max_r=8, current=1):
    """Feeds (time, total) samples to hpa_decide the way the controller would; returns (time, desired) pairs."""
    history = autoscale.History()
    out = []
    for now, total in steps:
        decision = autoscale.hpa_decide(
            now, current, [(total, target)], min_r, max_r, autoscale.Behavior.from_spec(behavior), history
        )
        history, current = decision.history, decision.desired
        out.append((now, current))
    return out


# -- the algorithm -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "current", "expected"),
    [
        (24, 1, 3),  # ceil(24 / 8)
        (16, 1, 2),  # exactly 2 pods' worth
        (0, 3, 0),  # nothing in flight: the bounds then apply
        (8.7, 1, 1),  # 8.7 / 8 = 1.09, within the 10 % tolerance: no change
        (23, 3, 3),  # 23 / 24 = 0.96, within the tolerance
        (20, 3, 3),  # 0.83: ceil(20 / 8) = 3
        (15, 3, 2),  # 0.63: ceil(15 / 8) = 2
        (9, 1, 2),  # 1.125, outside the tolerance
    ],
)
def test_replicas_for_an_average_value_metric(total, current, expected):
    assert autoscale.replicas_for_metric(total, 8, current) == expected


def test_scale_up_is_limited_by_the_policies_per_period():
    """Percent 100 and Pods 2 per 30 s, Max: from 1 to 3 (1 + 2 beats 1 x 2), 30 s later to 6, then max 8."""
    steps = [(t, 64.0) for t in range(0, 120, 15)]
    desired = dict(_run(steps))
    assert desired[0] == 3 and desired[15] == 3  # the 30 s period still counts the first step
    assert desired[30] == 6 and desired[45] == 6
    assert desired[60] == 8 and desired[105] == 8  # maxReplicas


def test_scale_down_waits_for_the_stabilization_window_then_one_pod_per_period():
    steps = [(0, 24.0), (15, 24.0)] + [(t, 0.0) for t in range(30, 1200, 15)]
    desired = _run(steps)
    assert desired[0] == (0, 3)
    # The highest recommendation of the last 600 s (3, at t=15) holds until it leaves the window at t=615.
    assert all(d == 3 for t, d in desired if t < 615)
    first_down = next(t for t, d in desired if d < 3)
    assert first_down == 615 and dict(desired)[615] == 2
    # Then one pod per 120 s, down to minReplicas.
    assert dict(desired)[720] == 2 and dict(desired)[735] == 1
    assert all(d == 1 for t, d in desired if t >= 735)


def test_a_short_dip_does_not_scale_down():
    steps = [(0, 24.0), (15, 0.0), (30, 24.0), (45, 0.0), (60, 24.0)]
    assert [d for _t, d in _run(steps)] == [3, 3, 3, 3, 3]


def test_percent_scale_down_with_min_select_policy_and_bounds():
    behavior = {
        "scaleUp": CHART_BEHAVIOR["scaleUp"],
        "scaleDown": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Min",  # the smallest change of the two policies
            "policies": [
                {"type": "Percent", "value": 50, "periodSeconds": 60},
                {"type": "Pods", "value": 4, "periodSeconds": 60},
            ],
        },
    }
    # From 8 to a proposal of 1: Percent allows 8 -> 4, Pods 8 -> 4; Min picks the smaller change.
    assert _run([(0, 1.0)], behavior, current=8) == [(0, 4)]
    behavior["scaleDown"]["policies"][1]["value"] = 2
    assert _run([(0, 1.0)], behavior, current=8) == [(0, 6)]
    behavior["scaleDown"]["selectPolicy"] = "Disabled"
    assert _run([(0, 1.0)], behavior, current=8) == [(0, 8)]
    # Outside the bounds the HPA goes straight to them.
    assert _run([(0, 0.0)], current=12) == [(0, 8)]
    assert _run([(0, 100.0)], min_r=2, current=1) == [(0, 2)]


def test_missing_metrics_never_scale_down_and_the_largest_proposal_wins():
    behavior = autoscale.Behavior.from_spec(CHART_BEHAVIOR)
    history = autoscale.History()
    none_down = autoscale.hpa_decide(0, 4, [(None, 8), (0.0, 2)], 1, 8, behavior, history)
    assert none_down.desired == 4 and "missing" in none_down.reason
    nothing = autoscale.hpa_decide(0, 4, [(None, 8)], 1, 8, behavior, history)
    assert nothing.desired == 4 and nothing.proposal is None
    both = autoscale.hpa_decide(0, 1, [(8.0, 8), (4.0, 2)], 1, 8, behavior, history)
    assert both.proposal == 2 and both.desired == 2  # queue 4 / 2 beats in flight 8 / 8


def test_decisions_are_pure():
    behavior = autoscale.Behavior.from_spec(CHART_BEHAVIOR)
    history = autoscale.History(recommendations=((0.0, 5),), scale_up_events=((0.0, 4),))
    first = autoscale.hpa_decide(10, 5, [(0.0, 8)], 1, 8, behavior, history)
    second = autoscale.hpa_decide(10, 5, [(0.0, 8)], 1, 8, behavior, history)
    assert first == second and history.recommendations == ((0.0, 5),)


def test_time_scaled_behavior_divides_every_duration():
    scaled = autoscale.scaled_behavior(CHART_BEHAVIOR, 30)
    assert scaled["scaleDown"]["stabilizationWindowSeconds"] == 20
    assert scaled["scaleDown"]["policies"][0]["periodSeconds"] == 4
    assert [p["periodSeconds"] for p in scaled["scaleUp"]["policies"]] == [1, 1]
    assert scaled["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert CHART_BEHAVIOR["scaleDown"]["stabilizationWindowSeconds"] == 600  # not modified in place


# -- the simulation against the stack --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    prometheus_binary() is None, reason="prometheus is not installed (Debian package `prometheus`)"
)
@pytest.mark.skipif(missing_tools_reason() is not None, reason=str(missing_tools_reason()))
def test_desired_workers_rise_under_load_and_fall_back_after_the_stabilization_window(omni_stack, tmp_path):
    spec = autoscale.chart_autoscaling(time_scale=TIME_SCALE)
    assert spec.behavior_spec == autoscale.scaled_behavior(CHART_BEHAVIOR, TIME_SCALE), "values.yaml changed?"
    assert set(spec.metrics) == {"omnigate_worker_in_flight_requests", "omnigate_worker_queue_depth"}
    stabilization = spec.behavior.scale_down.stabilization_s
    down_period = spec.behavior.scale_down.longest_period_s()
    phases = [
        autoscale.Phase("idle", 8, 0),
        autoscale.Phase("high", 20, CONCURRENCY),
        autoscale.Phase("idle after", 70, 0, until_settled=True),
    ]
    result = autoscale.simulate(
        omni_stack.gateway.target,
        f"127.0.0.1:{omni_stack.gateway.metrics_port}",
        f"127.0.0.1:{omni_stack.worker.metrics_port}",
        spec,
        phases,
        tmp_path,
        SYNC_PERIOD_S,
    )
    json_path, png_path = autoscale.write_results(result, "autoscale-test")
    assert png_path.stat().st_size > 10_000 and json_path.stat().st_size > 1_000

    samples = result["samples"]
    phase = {p["phase"]: p for p in result["phases"]}
    high, in_flight = phase["high"], "omnigate_worker_in_flight_requests"
    assert not result["failed_requests"], result["failed_requests"]
    assert result["completed_requests"] >= CONCURRENCY
    # Idle: the metric is there (0) and the HPA stays at minReplicas.
    idle = [s for s in samples if s["phase"] == "idle"]
    assert idle and all(s["metrics"][in_flight] == 0 and s["desired"] == spec.min_replicas for s in idle), (
        idle
    )
    # Under load the metric shows the clients and the desired count rises within a bounded time.
    loaded = [s for s in samples if s["phase"] == "high" and s["t"] > high["start_s"] + 10]
    peak_metric = max(s["metrics"][in_flight] for s in loaded)
    assert CONCURRENCY / 2 <= peak_metric <= CONCURRENCY, peak_metric
    rise = result["summary"]["rise_after_load_start_s"]
    assert rise is not None and rise <= 15, result["summary"]
    peak = result["summary"]["peak_desired"]
    assert 2 <= peak <= spec.max_replicas, peak
    # The HPA never asks for more than the metrics have asked for (queue spikes may ask for more than the
    # in-flight count alone would).
    proposals = [s["proposal"] for s in samples if s["proposal"] is not None]
    assert peak <= max(proposals), (peak, max(proposals))
    # After the load: the stabilization window holds the count, then it falls back to minReplicas.
    after = [s for s in samples if s["t"] >= high["end_s"]]
    held = [s for s in after if s["t"] <= high["end_s"] + stabilization - 2 * SYNC_PERIOD_S]
    assert held and all(s["desired"] > spec.min_replicas for s in held), held
    back = result["summary"]["back_to_min_after_load_end_s"]
    bound = stabilization + (peak - spec.min_replicas) * down_period + 5 * SYNC_PERIOD_S + 10
    assert back is not None and stabilization - 2 * SYNC_PERIOD_S <= back <= bound, result["summary"]
