"""tracing.* values: both components export to the same OTLP collector, per-component config wins."""

from __future__ import annotations

from omnigate_gateway.settings import GatewaySettings
from omnigate_worker.settings import WorkerSettings
from tests.charts.chart import GATEWAY, WORKER, container, env, render, render_profile

ENDPOINT = "http://otel-collector.observability:4317"


def _envs(rendered) -> tuple[dict, dict]:
    return (
        env(container(rendered.one("Deployment", GATEWAY), "gateway")),
        env(container(rendered.one("Deployment", WORKER), "worker")),
    )


def test_export_is_off_by_default():
    for component_env in _envs(render_profile("default")):
        assert not [name for name in component_env if "OTLP" in name or "TRACE" in name]


def test_one_endpoint_reaches_both_components():
    gateway, worker = _envs(
        render(set_values={"tracing.otlpEndpoint": ENDPOINT, "tracing.sampleRatio": 0.25})
    )
    assert gateway["OMNIGATE_GATEWAY_OTLP_ENDPOINT"] == worker["OMNIGATE_WORKER_OTLP_ENDPOINT"] == ENDPOINT
    assert (
        gateway["OMNIGATE_GATEWAY_TRACE_SAMPLE_RATIO"]
        == worker["OMNIGATE_WORKER_TRACE_SAMPLE_RATIO"]
        == "0.25"
    )
    # What the chart renders is what the services accept.
    settings = GatewaySettings(
        otlp_endpoint=gateway["OMNIGATE_GATEWAY_OTLP_ENDPOINT"],
        trace_sample_ratio=gateway["OMNIGATE_GATEWAY_TRACE_SAMPLE_RATIO"],
    )
    assert settings.trace_sample_ratio == 0.25
    assert (
        WorkerSettings(trace_sample_ratio=worker["OMNIGATE_WORKER_TRACE_SAMPLE_RATIO"]).trace_sample_ratio
        == 0.25
    )


def test_component_config_takes_precedence_without_duplicate_variables():
    rendered = render(
        set_values={
            "tracing.otlpEndpoint": ENDPOINT,
            "worker.config.otlp_endpoint": "https://gpu-collector:4317",
            "gateway.config.trace_sample_ratio": 0.5,
        }
    )
    for deployment, name in (
        (rendered.one("Deployment", GATEWAY), "gateway"),
        (rendered.one("Deployment", WORKER), "worker"),
    ):
        names = [e["name"] for e in container(deployment, name)["env"]]
        assert len(names) == len(set(names)), f"duplicate variables in the {name}: {names}"
    gateway, worker = _envs(rendered)
    assert worker["OMNIGATE_WORKER_OTLP_ENDPOINT"] == "https://gpu-collector:4317"
    assert gateway["OMNIGATE_GATEWAY_OTLP_ENDPOINT"] == ENDPOINT
    assert float(gateway["OMNIGATE_GATEWAY_TRACE_SAMPLE_RATIO"]) == 0.5
