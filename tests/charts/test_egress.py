"""Egress is fenced. Workers: DNS, the model hub over HTTPS while downloading, nothing in the cluster or metadata.
Gateways: DNS, their workers, media URLs on public addresses (a network backstop for the gateway's URL policy),
the internal networks the gateway's settings allow, nothing else in the cluster or metadata."""

from __future__ import annotations

import ipaddress

import kubernetes_validate
import pytest

from tests.charts.chart import (
    GATEWAY,
    KUBERNETES_VERSIONS,
    PROFILES,
    WORKER,
    pod_labels,
    render,
    render_profile,
    selects,
)

EGRESS = f"{WORKER}-egress"
GATEWAY_EGRESS = f"{GATEWAY}-egress"
METADATA = "169.254.169.254"
IN_CLUSTER = [
    "10.96.0.1",
    "10.244.3.7",
    "172.20.0.10",
    "192.168.1.20",
    "100.64.0.5",
    "127.0.0.1",
    "fd00:ec2::254",
]
HUB = ["18.244.102.38", "2600:9000:2100::1"]  # public addresses, as a CDN in front of the hub has


def _allowed(policy: dict, address: str, port: int) -> bool:
    """Whether an egress policy's ipBlock rules let the pod reach address:port over TCP."""
    ip = ipaddress.ip_address(address)
    for rule in policy["spec"]["egress"]:
        ports = [p["port"] for p in rule.get("ports", []) if p.get("protocol", "TCP") == "TCP"]
        if rule.get("ports") and port not in ports:
            continue
        for peer in rule.get("to", []):
            block = peer.get("ipBlock")
            if block is None:
                continue
            network = ipaddress.ip_network(block["cidr"])
            if ip.version != network.version or ip not in network:
                continue
            if not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])):
                return True
    return False


@pytest.mark.parametrize("profile", PROFILES)
def test_workers_egress_policy_selects_the_workers_only(profile):
    rendered = render_profile(profile)
    policy = rendered.one("NetworkPolicy", EGRESS)
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert selects(policy["spec"]["podSelector"], pod_labels(rendered.one("Deployment", WORKER)))
    assert not selects(policy["spec"]["podSelector"], pod_labels(rendered.one("Deployment", GATEWAY)))
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)


@pytest.mark.parametrize("profile", ["default", "cpu-dev"])
def test_downloading_workers_reach_the_hub_over_https_and_nothing_else(profile):
    policy = render_profile(profile).one("NetworkPolicy", EGRESS)
    for address in HUB:
        assert _allowed(policy, address, 443), address
        assert not _allowed(policy, address, 80), address  # HTTPS only
        assert not _allowed(policy, address, 22), address
    # Not the cloud metadata service (credentials of the node), on any port.
    for port in (80, 443, 8080):
        assert not _allowed(policy, METADATA, port)
    # Not the cluster's pods and Services (the API server, other releases' workers, databases).
    for address in IN_CLUSTER:
        for port in (443, 6443, 50061, 5432):
            assert not _allowed(policy, address, port), (address, port)


def test_dns_is_the_cluster_dns_only():
    policy = render_profile("default").one("NetworkPolicy", EGRESS)
    (dns,) = [r for r in policy["spec"]["egress"] if any(p["port"] == 53 for p in r["ports"])]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    (peer,) = dns["to"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def test_a_worker_loading_a_local_model_gets_no_internet_at_all():
    policy = render(set_values={"worker.model.localPath": "/models/qwen"}).one("NetworkPolicy", EGRESS)
    assert len(policy["spec"]["egress"]) == 1  # DNS only
    for address in [*HUB, METADATA, *IN_CLUSTER]:
        assert not _allowed(policy, address, 443)


def test_tracing_opens_the_collectors_port_but_not_the_metadata_address():
    policy = render(set_values={"tracing.otlpEndpoint": "http://otel-collector.observability:4318"}).one(
        "NetworkPolicy", EGRESS
    )
    assert _allowed(policy, "10.96.12.7", 4318)  # the collector's Service, in the cluster
    assert not _allowed(policy, METADATA, 4318)
    assert not _allowed(policy, "10.96.12.7", 443)
    default_port = render(set_values={"tracing.otlpEndpoint": "https://otel.example.com"}).one(
        "NetworkPolicy", EGRESS
    )
    assert _allowed(default_port, "10.96.12.7", 4317)


def test_extra_rules_and_a_narrower_hub_are_used_as_given():
    store = {"to": [{"podSelector": {"matchLabels": {"app": "model-store"}}}], "ports": [{"port": 9000}]}
    policy = render(
        set_values={
            "networkPolicy.egress.extraWorkerRules": [store],
            "networkPolicy.egress.modelHub.to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
        }
    ).one("NetworkPolicy", EGRESS)
    assert store in policy["spec"]["egress"]
    assert _allowed(policy, "203.0.113.9", 443)
    assert not _allowed(policy, HUB[0], 443)


def test_egress_policy_can_be_turned_off():
    off = render(set_values={"networkPolicy.egress.enabled": "false"})
    assert off.maybe("NetworkPolicy", EGRESS) is None and off.maybe("NetworkPolicy", GATEWAY_EGRESS) is None
    assert render(set_values={"networkPolicy.enabled": "false"}).all("NetworkPolicy") == []


# -- the gateways ---------------------------------------------------------------------------------------------


def _peers_selecting(policy: dict, labels: dict) -> list[dict]:
    """The egress rules whose podSelector peers (same namespace) select pods with these labels."""
    return [
        rule
        for rule in policy["spec"]["egress"]
        if any(
            "podSelector" in p and "namespaceSelector" not in p and selects(p["podSelector"], labels)
            for p in rule.get("to", [])
        )
    ]


@pytest.mark.parametrize("profile", PROFILES)
def test_gateways_reach_their_workers_and_public_media_but_not_metadata_or_the_cluster(profile):
    rendered = render_profile(profile)
    policy = rendered.one("NetworkPolicy", GATEWAY_EGRESS)
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert selects(policy["spec"]["podSelector"], pod_labels(rendered.one("Deployment", GATEWAY)))
    assert not selects(policy["spec"]["podSelector"], pod_labels(rendered.one("Deployment", WORKER)))
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)
    # Its workers' gRPC port, by their labels.
    (to_workers,) = _peers_selecting(policy, pod_labels(rendered.one("Deployment", WORKER)))
    assert to_workers["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    # Media URLs on public addresses, on any port a URL may name.
    for address in HUB:
        for port in (443, 80, 8443):
            assert _allowed(policy, address, port), (address, port)
    # Never the metadata service or the cluster's pods and Services, whatever the URL policy lets through.
    for port in (80, 443, 8080):
        assert not _allowed(policy, METADATA, port)
    for address in IN_CLUSTER:
        for port in (80, 443, 6443, 50061, 5432):
            assert not _allowed(policy, address, port), (address, port)


def test_the_gateways_allowed_networks_setting_opens_those_blocks_only(tmp_path):
    values = tmp_path / "values.yaml"  # a values file: --set would split the comma-separated setting
    values.write_text('gateway:\n  config:\n    allowed_networks: "10.40.0.0/16, fd12:3456::/48"\n')
    policy = render([values]).one("NetworkPolicy", GATEWAY_EGRESS)
    assert _allowed(policy, "10.40.2.3", 9000) and _allowed(policy, "fd12:3456::7", 443)
    assert not _allowed(policy, "10.41.0.1", 443)
    assert not _allowed(policy, METADATA, 80)


def test_allow_private_networks_opens_private_media_but_never_the_metadata_address():
    policy = render(set_values={"gateway.config.allow_private_networks": "true"}).one(
        "NetworkPolicy", GATEWAY_EGRESS
    )
    assert _allowed(policy, "10.96.0.10", 80)
    assert not _allowed(policy, METADATA, 80)


def test_gateway_media_can_be_narrowed_and_extended():
    proxy = {"to": [{"podSelector": {"matchLabels": {"app": "media-proxy"}}}], "ports": [{"port": 3128}]}
    policy = render(
        set_values={
            "networkPolicy.egress.extraGatewayRules": [proxy],
            "networkPolicy.egress.gateway.mediaTo": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
            "networkPolicy.egress.gateway.mediaPorts": [443],
        }
    ).one("NetworkPolicy", GATEWAY_EGRESS)
    assert proxy in policy["spec"]["egress"]
    assert _allowed(policy, "203.0.113.9", 443)
    assert not _allowed(policy, "203.0.113.9", 80)
    assert not _allowed(policy, HUB[0], 443)
