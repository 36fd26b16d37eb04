"""The gateway's edge: optional Ingress and Gateway API routes, and a metrics port that never leaves the cluster."""

from __future__ import annotations

import kubernetes_validate
import pytest

from tests.charts.chart import (
    GATEWAY,
    KUBERNETES_VERSIONS,
    PROFILES,
    container,
    env,
    helm,
    render,
    render_profile,
    template_args,
)

METRICS_SERVICE = f"{GATEWAY}-metrics"
ROUTES = {
    "gateway.httpRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gateway-system"}]},
    "gateway.grpcRoute": {
        "enabled": True,
        "parentRefs": [{"name": "public", "namespace": "gateway-system", "sectionName": "grpc"}],
        "hostnames": ["omnigate.example.com"],
    },
}


def _service_ports(service: dict) -> dict[str, int]:
    return {p["name"]: p["port"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("profile", PROFILES)
def test_no_ingress_or_routes_by_default(profile):
    kinds = {d["kind"] for d in render_profile(profile).docs}
    assert not kinds & {"Ingress", "HTTPRoute", "GRPCRoute"}


def test_ingress_sends_the_http_api_to_the_gateway_service():
    rendered = render(
        set_values={
            "gateway.ingress.enabled": "true",
            "gateway.ingress.className": "nginx",
            "gateway.ingress.tls": [{"secretName": "omnigate-tls", "hosts": ["omnigate.example.com"]}],
        }
    )
    ingress = rendered.one("Ingress", GATEWAY)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "omnigate-tls", "hosts": ["omnigate.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "omnigate.example.com"
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": GATEWAY, "port": {"name": "http"}}
    assert "http" in _service_ports(rendered.one("Service", GATEWAY))
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(ingress, version, strict=True)


def test_ingress_can_send_grpc_with_the_controllers_annotation_and_any_host():
    ingress = render(
        set_values={
            "gateway.ingress.enabled": "true",
            "gateway.ingress.backend": "grpc",
            "gateway.ingress.annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"},
            "gateway.ingress.hosts": [{"host": "", "paths": [{"path": "/", "pathType": "Prefix"}]}],
        }
    ).one("Ingress", GATEWAY)
    assert ingress["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"}
    (rule,) = ingress["spec"]["rules"]
    assert "host" not in rule
    assert rule["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "grpc"}
    kubernetes_validate.validate(ingress, KUBERNETES_VERSIONS[-1], strict=True)


def test_ingress_never_routes_the_metrics_port():
    result = helm(
        *template_args(
            set_values={"gateway.ingress.enabled": "true", "gateway.ingress.backend": "http-metrics"}
        ),
        check=False,
    )
    assert result.returncode != 0
    assert "/gateway/ingress/backend" in result.stderr


def test_gateway_api_routes_attach_the_http_and_grpc_ports():
    rendered = render(set_values=ROUTES)
    service_ports = _service_ports(rendered.one("Service", GATEWAY))
    http = rendered.one("HTTPRoute", GATEWAY)
    assert http["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert http["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateway-system"}]
    (rule,) = http["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"name": GATEWAY, "port": service_ports["http"]}]
    grpc = rendered.one("GRPCRoute", GATEWAY)
    assert grpc["spec"]["hostnames"] == ["omnigate.example.com"]
    (rule,) = grpc["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": GATEWAY, "port": service_ports["grpc"]}]
    # The Service tells the Gateway the gRPC port is plaintext HTTP/2.
    (grpc_port,) = [p for p in rendered.one("Service", GATEWAY)["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port["appProtocol"] == "kubernetes.io/h2c"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"gateway.httpRoute.enabled": "true"},
            "gateway.httpRoute.enabled needs gateway.httpRoute.parentRefs",
        ),
        (
            {"gateway.grpcRoute.enabled": "true"},
            "gateway.grpcRoute.enabled needs gateway.grpcRoute.parentRefs",
        ),
        (
            {"gateway.ingress.enabled": "true", "gateway.ingress.hosts": []},
            "gateway.ingress.enabled needs at least one entry in gateway.ingress.hosts",
        ),
        ({"gateway.httpRoute.parentRefs": [{"nmae": "public"}]}, "/gateway/httpRoute/parentRefs/0"),
    ],
)
def test_incomplete_edge_values_are_refused(values, message):
    result = helm(*template_args(set_values=values), check=False)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_an_exposed_gateway_service_never_publishes_the_metrics_port(service_type):
    rendered = render(
        set_values={"gateway.service.type": service_type, "metrics.serviceMonitor.enabled": "true"}
    )
    public = rendered.one("Service", GATEWAY)
    assert public["spec"]["type"] == service_type
    assert set(_service_ports(public)) == {"grpc", "http"}
    metrics = rendered.one("Service", METRICS_SERVICE)
    assert metrics["spec"]["type"] == "ClusterIP"
    assert _service_ports(metrics) == {"http-metrics": 9400}
    assert metrics["spec"]["selector"] == public["spec"]["selector"]
    # The ServiceMonitor finds the metrics Service and still labels the series with the gateway's job,
    # which every alert, recording rule and autoscaling query selects.
    monitor = rendered.one("ServiceMonitor", GATEWAY)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http-metrics"
    assert {"targetLabel": "job", "replacement": GATEWAY} in endpoint["relabelings"]


def test_a_cluster_ip_gateway_service_keeps_its_metrics_port_and_needs_no_second_service():
    rendered = render_profile("default")
    assert "http-metrics" in _service_ports(rendered.one("Service", GATEWAY))
    assert rendered.maybe("Service", METRICS_SERVICE) is None


def test_the_metrics_service_name_stays_a_valid_name_with_long_release_names():
    long_release = "a-very-long-release-name-for-serving-production-eu"
    out = render(set_values={"gateway.service.type": "LoadBalancer"}, release=long_release)
    names = [d["metadata"]["name"] for d in out.all("Service")]
    assert all(len(n) <= 63 for n in names), names
    assert len(set(names)) == len(names)


def test_connection_ageing_of_the_public_port_is_set_through_gateway_config():
    """gRPC connection ageing (A9) is the gateway's own setting: by default the chart leaves the gateway's
    defaults (300 s, grace 660 s); gateway.config sets both."""
    names = {"OMNIGATE_GATEWAY_MAX_CONNECTION_AGE_S", "OMNIGATE_GATEWAY_MAX_CONNECTION_AGE_GRACE_S"}
    assert not set(env(container(render().one("Deployment", GATEWAY), "gateway"))) & names
    rendered = render(
        set_values={
            "gateway.config.max_connection_age_s": "120",
            "gateway.config.max_connection_age_grace_s": "900",
        }
    )
    values = env(container(rendered.one("Deployment", GATEWAY), "gateway"))
    assert values["OMNIGATE_GATEWAY_MAX_CONNECTION_AGE_S"] == "120"
    assert values["OMNIGATE_GATEWAY_MAX_CONNECTION_AGE_GRACE_S"] == "900"
