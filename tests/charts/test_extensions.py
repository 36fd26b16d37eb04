"""Extension points of both pods: extra volumes and mounts, init containers and sidecars."""

from __future__ import annotations

import kubernetes_validate
import pytest

from tests.charts.chart import (
    GATEWAY,
    KUBERNETES_VERSIONS,
    PROFILES,
    WORKER,
    container,
    containers,
    helm,
    pod_spec,
    render,
    render_profile,
    template_args,
)
from tests.charts.test_qos import qos_class

MAIN = {"gateway": (GATEWAY, "gateway"), "worker": (WORKER, "worker")}
VOLUME = {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}
MOUNT = {"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True}
INIT = {"name": "wait-for-store", "image": "busybox:1.36", "command": ["sh", "-c", "true"]}
SIDECAR = {
    "name": "log-shipper",
    "image": "fluent/fluent-bit:3.0",
    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
}


def _extended(component: str, profile_values=None) -> dict:
    return {
        **(profile_values or {}),
        f"{component}.extraVolumes": [VOLUME],
        f"{component}.extraVolumeMounts": [MOUNT],
        f"{component}.initContainers": [INIT],
        f"{component}.extraContainers": [SIDECAR],
    }


@pytest.mark.parametrize("component", ["gateway", "worker"])
def test_nothing_extra_by_default(component):
    name, main = MAIN[component]
    deployment = render_profile("default").one("Deployment", name)
    assert [c["name"] for c in pod_spec(deployment)["containers"]] == [main]
    assert [c["name"] for c in pod_spec(deployment).get("initContainers", [])] in ([], ["prefetch-model"])


@pytest.mark.parametrize("component", ["gateway", "worker"])
def test_extra_volumes_mounts_init_containers_and_sidecars_reach_the_pod(component):
    name, main = MAIN[component]
    deployment = render(set_values=_extended(component)).one("Deployment", name)
    spec = pod_spec(deployment)
    assert VOLUME in spec["volumes"]
    assert spec["volumes"][0]["name"] == "tmp"  # the chart's own volumes stay
    assert MOUNT in container(deployment, main)["volumeMounts"]
    assert [c["name"] for c in spec["containers"]] == [main, "log-shipper"]
    assert spec["containers"][1] == SIDECAR
    init_names = [c["name"] for c in spec["initContainers"]]
    # The worker's own model download runs first, so an extra init container may use the model.
    assert init_names == (
        ["prefetch-model", "wait-for-store"] if component == "worker" else ["wait-for-store"]
    )
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(deployment, version, strict=True)


def test_worker_init_containers_without_prefetch():
    deployment = render(set_values={"worker.prefetch.enabled": "false", "worker.initContainers": [INIT]}).one(
        "Deployment", WORKER
    )
    assert [c["name"] for c in pod_spec(deployment)["initContainers"]] == ["wait-for-store"]


def test_extension_values_are_templated():
    deployment = render(
        set_values={
            "worker.extraVolumes": [{"name": "extra", "configMap": {"name": "{{ .Release.Name }}-extra"}}]
        }
    ).one("Deployment", WORKER)
    assert {"name": "extra", "configMap": {"name": "og-extra"}} in pod_spec(deployment)["volumes"]


def test_a_guaranteed_worker_stays_guaranteed_with_a_sized_sidecar():
    gpu_prod = render(
        files=PROFILES["gpu-prod"],
        set_values={"worker.extraContainers": [SIDECAR]},
    )
    assert qos_class(gpu_prod.one("Deployment", WORKER)) == "Guaranteed"
    assert len(containers(gpu_prod.one("Deployment", WORKER), init=False)) == 2


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"worker.extraVolumes": [{"name": "model-cache", "emptyDir": {}}]},
            'worker.extraVolumes: the name "model-cache" is one of the chart\'s own volumes',
        ),
        (
            {"gateway.extraVolumes": [{"name": "tmp", "emptyDir": {}}]},
            'gateway.extraVolumes: the name "tmp" is one of the chart\'s own volumes',
        ),
        (
            {"worker.extraContainers": [{"name": "worker", "image": "x"}]},
            'the name "worker" is taken by the chart\'s own container',
        ),
        (
            {"worker.initContainers": [{"name": "prefetch-model", "image": "x"}]},
            'the name "prefetch-model" is taken by the chart\'s own container',
        ),
        ({"gateway.extraContainers": [{"image": "x"}]}, "/gateway/extraContainers/0"),
        ({"gateway.extraVolumeMounts": [{"name": "x"}]}, "/gateway/extraVolumeMounts/0"),
    ],
)
def test_clashing_or_incomplete_extensions_are_refused(values, message):
    result = helm(*template_args(set_values=values), check=False)
    assert result.returncode != 0
    assert message in result.stderr
