"""GPU workers in production are the last pods evicted: Guaranteed QoS, with /dev/shm inside the memory limit."""

from __future__ import annotations

import re

import pytest

from tests.charts.chart import (
    CHART_DIR,
    NAMESPACE,
    RELEASE,
    WORKER,
    containers,
    helm,
    pod_spec,
    render,
    render_profile,
    template_args,
)

_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(value) -> float:
    """A Kubernetes quantity as a number (cpu "500m" = 0.5, memory "16Gi" = bytes)."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    if unit == "m":
        return float(number) / 1000
    return float(number) * _UNITS.get(unit, 1)


def qos_class(workload: dict) -> str:
    """The pod's QoS class as the kubelet computes it (over init and regular containers alike)."""
    guaranteed, any_set = True, False
    for c in containers(workload, init=True):
        requests = c.get("resources", {}).get("requests", {})
        limits = c.get("resources", {}).get("limits", {})
        any_set |= bool(requests or limits)
        for resource in ("cpu", "memory"):
            if resource not in limits:
                guaranteed = False
            elif quantity(requests.get(resource, limits[resource])) != quantity(limits[resource]):
                guaranteed = False
    if guaranteed:
        return "Guaranteed"
    return "Burstable" if any_set else "BestEffort"


def test_gpu_prod_workers_have_guaranteed_qos():
    worker = render_profile("gpu-prod").one("Deployment", WORKER)
    assert [c["name"] for c in containers(worker)] == ["wait-for-model", "worker"]  # both count
    assert qos_class(worker) == "Guaranteed"


@pytest.mark.parametrize("profile", ["default", "keda"])
def test_gpu_workers_have_guaranteed_qos_by_default(profile):
    worker = render_profile(profile).one("Deployment", WORKER)
    assert any("nvidia.com/gpu" in str(c.get("resources")) for c in containers(worker))
    assert qos_class(worker) == "Guaranteed"


def test_the_qos_check_can_tell_burstable_pods_and_the_notes_warn_of_them():
    """Requesting half the memory limit is Burstable, as the issue found the GPU workers before."""
    burstable = {"worker.resources.requests.memory": "32Gi"}
    assert qos_class(render(set_values=burstable).one("Deployment", WORKER)) == "Burstable"
    no_cpu_limit = {"worker.prefetch.resources.limits.cpu": None}
    assert qos_class(render(set_values=no_cpu_limit).one("Deployment", WORKER)) == "Burstable"

    def notes(values: dict) -> str:
        args = ["install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--dry-run=client"]
        for key, value in values.items():
            args += ["--set-json", f"{key}=null"] if value is None else ["--set", f"{key}={value}"]
        return helm(*args).stdout.split("NOTES:", 1)[1]

    assert "do not have Guaranteed QoS" in notes(burstable)
    assert "do not have Guaranteed QoS" in notes(no_cpu_limit)
    assert "Guaranteed QoS" not in notes({})
    assert "Guaranteed QoS" not in notes({**burstable, "worker.gpu.enabled": "false"})


@pytest.mark.parametrize("profile", ["default", "gpu-prod", "keda"])
def test_shared_memory_is_memory_backed_and_fits_inside_the_memory_limit(profile):
    worker = render_profile(profile).one("Deployment", WORKER)
    (shm,) = [v for v in pod_spec(worker)["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    (main,) = [c for c in containers(worker, init=False) if c["name"] == "worker"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in main["volumeMounts"]
    # tmpfs pages count against the container's memory limit: a full /dev/shm must leave room for the process.
    assert quantity(shm["emptyDir"]["sizeLimit"]) < quantity(main["resources"]["limits"]["memory"])


def test_gpu_prod_leaves_most_of_the_memory_limit_to_the_process():
    worker = render_profile("gpu-prod").one("Deployment", WORKER)
    (shm,) = [v for v in pod_spec(worker)["volumes"] if v["name"] == "dshm"]
    limits = containers(worker, init=False)[0]["resources"]["limits"]
    assert quantity(shm["emptyDir"]["sizeLimit"]) <= quantity(limits["memory"]) / 4
    assert limits["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("size", ["64Gi", "80000M", "70Gi"])
def test_shared_memory_at_or_above_the_memory_limit_is_refused(size):
    result = helm(*template_args(set_values={"worker.shm.sizeLimit": size}), check=False)
    assert result.returncode != 0
    assert f"worker.shm.sizeLimit ({size}) is not below the worker's memory limit (64Gi)" in result.stderr


def test_shared_memory_just_below_the_limit_and_without_a_limit_is_accepted():
    render(set_values={"worker.shm.sizeLimit": "63.5Gi"})
    unlimited = render(set_values={"worker.resources.limits": None, "worker.shm.sizeLimit": "128Gi"})
    worker = unlimited.one("Deployment", WORKER)
    assert "memory" not in containers(worker, init=False)[0]["resources"]["limits"]
