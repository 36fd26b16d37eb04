"""What matters in the rendered manifests, asserted on the objects `helm template` produces."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry

from omnigate_gateway.metrics import GatewayMetrics
from omnigate_worker.metrics import WorkerMetrics
from tests.charts.chart import (
    CHART_DIR,
    GATEWAY,
    NAMESPACE,
    PROFILES,
    RELEASE,
    WORKER,
    container,
    containers,
    env,
    helm,
    pod_labels,
    pod_spec,
    render,
    render_profile,
    selects,
)


def exported_series_names(metrics_class) -> set[str]:
    """The series names a service really exports (from its metrics module, on a private registry)."""
    registry = CollectorRegistry()
    metrics_class(registry)
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {family.name, f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
    return names


GATEWAY_SERIES = exported_series_names(GatewayMetrics)
WORKER_SERIES = exported_series_names(WorkerMetrics)
OMNIGATE_METRIC = re.compile(r"\bomnigate_[a-z_]+\b")


def worker_deployment(profile: str) -> dict:
    return render_profile(profile).one("Deployment", WORKER)


def gateway_deployment(profile: str) -> dict:
    return render_profile(profile).one("Deployment", GATEWAY)


# -- GPUs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["default", "gpu-prod", "keda"])
def test_gpu_profiles_request_gpus_and_tolerate_gpu_taints(profile):
    worker = worker_deployment(profile)
    resources = container(worker, "worker")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1  # extended resources: requests must equal limits
    tolerations = pod_spec(worker)["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert env(container(worker, "worker"))["OMNIGATE_WORKER_DEVICE"] == "cuda:0"
    # Only the worker asks for GPUs.
    for c in containers(gateway_deployment(profile)) + containers(worker, init=True)[:-1]:
        assert "nvidia.com/gpu" not in str(c.get("resources", {}))


@pytest.mark.parametrize("profile", ["gpu-prod", "keda"])
def test_gpu_profiles_schedule_on_any_gpu_node_of_a_stock_cluster(profile):
    # The GPU request alone places the pod. A vendor node label (GPU feature discovery's nvidia.com/gpu.*,
    # GKE's cloud.google.com/gke-accelerator) or a RuntimeClass named nvidia exists only on some clusters:
    # the pod would stay Pending, or be refused by the API server.
    spec = pod_spec(worker_deployment(profile))
    assert not spec.get("nodeSelector")
    assert "runtimeClassName" not in spec


def test_gpu_prod_tolerates_its_taint_and_has_shared_memory():
    worker = worker_deployment("gpu-prod")
    spec = pod_spec(worker)
    assert {"key": "dedicated", "operator": "Equal", "value": "inference", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(worker, "worker")["volumeMounts"]


def test_gpu_count_is_configurable():
    worker = render(set_values={"worker.gpu.count": "4"}).one("Deployment", WORKER)
    resources = container(worker, "worker")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 4 == resources["requests"]["nvidia.com/gpu"]


def test_cpu_dev_has_no_gpu_and_builds_the_tiny_model():
    worker = worker_deployment("cpu-dev")
    spec = pod_spec(worker)
    assert "nvidia.com/gpu" not in str(spec)
    assert "tolerations" not in spec
    main = container(worker, "worker")
    assert env(main)["OMNIGATE_WORKER_DEVICE"] == "cpu"
    prefetch = container(worker, "prefetch-model")
    assert prefetch["command"][:3] == ["python", "-m", "omnigate_tiny"]
    models_dir = env(prefetch)["OMNIGATE_MODELS_DIR"]
    assert prefetch["command"][-1] == "$(OMNIGATE_MODELS_DIR)"
    assert env(main)["OMNIGATE_WORKER_MODEL"] == f"{models_dir}/tiny-qwen2.5-omni"


# -- model cache and prefetch -----------------------------------------------------------------------------


def test_prefetched_model_is_loaded_offline_from_the_cache_volume():
    worker = worker_deployment("default")
    prefetch, main = container(worker, "prefetch-model"), container(worker, "worker")
    assert pod_spec(worker)["initContainers"] == [prefetch]
    model_dir = env(prefetch)["OMNIGATE_MODEL_DIR"]
    assert (
        env(main)["OMNIGATE_WORKER_MODEL"] == model_dir == "/var/cache/omnigate/models/Qwen/Qwen2.5-Omni-3B"
    )
    assert env(main)["HF_HUB_OFFLINE"] == "1"
    cache_mount = {"name": "model-cache", "mountPath": "/var/cache/omnigate"}
    assert cache_mount in prefetch["volumeMounts"]  # the prefetch writes, the worker only reads
    assert {**cache_mount, "readOnly": True} in main["volumeMounts"]
    assert env(main)["HF_HOME"].startswith("/var/cache/omnigate/")


def test_without_prefetch_the_worker_downloads_by_model_id_with_the_token():
    worker = render(
        set_values={"worker.prefetch.enabled": "false", "worker.model.hfTokenSecret.name": "hf"}
    ).one("Deployment", WORKER)
    assert "initContainers" not in pod_spec(worker)
    main = container(worker, "worker")
    assert env(main)["OMNIGATE_WORKER_MODEL"] == "Qwen/Qwen2.5-Omni-3B"
    assert "HF_HUB_OFFLINE" not in env(main)
    (token,) = [e for e in main["env"] if e["name"] == "HF_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}


@pytest.mark.parametrize(
    ("cache_type", "volume_key"),
    [
        ("emptyDir", "emptyDir"),
        ("ephemeral", "ephemeral"),
        ("persistentVolumeClaim", "persistentVolumeClaim"),
    ],
)
def test_model_cache_volume_types(cache_type, volume_key):
    rendered = render(
        set_values={
            "worker.modelCache.type": cache_type,
            # A shared cache needs a pinned commit and, for ReadWriteMany, an explicit StorageClass.
            "worker.model.revision": "0123456789abcdef0123456789abcdef01234567",
            "worker.modelCache.persistentVolumeClaim.storageClassName": "nfs-rwx",
        }
    )
    (volume,) = [
        v for v in pod_spec(rendered.one("Deployment", WORKER))["volumes"] if v["name"] == "model-cache"
    ]
    assert set(volume) == {"name", volume_key}
    claim = rendered.maybe("PersistentVolumeClaim", f"{WORKER}-model-cache")
    if cache_type == "persistentVolumeClaim":
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    else:
        assert claim is None


# -- probes, drain -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_worker_probes_use_native_grpc_health_with_a_long_startup(profile):
    worker = container(worker_deployment(profile), "worker")
    (grpc_port,) = [p["containerPort"] for p in worker["ports"] if p["name"] == "grpc"]
    for probe in ("startupProbe", "readinessProbe"):
        assert worker[probe]["grpc"] == {"port": grpc_port}, probe
    # Liveness is a question of its own: is the engine dead (omnigate_worker/liveness.py)?
    assert worker["livenessProbe"]["grpc"] == {"port": grpc_port, "service": "liveness"}
    startup = worker["startupProbe"]
    if profile != "cpu-dev":  # real models: give loading and warm-up at least 20 minutes
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200


@pytest.mark.parametrize("profile", PROFILES)
def test_gateway_probes_ask_its_readiness_and_liveness_services_never_the_workers(profile):
    # omnigate_gateway/health.py: "readiness" is SERVING from start-up until the drain whatever the workers
    # do (the gateway answers in-band without one), so a worker outage (or scale to zero, the keda profile)
    # keeps every gateway in rotation; "liveness" is answered by the event loop that serves requests.
    gateway = container(gateway_deployment(profile), "gateway")
    (grpc_port,) = [p["containerPort"] for p in gateway["ports"] if p["name"] == "grpc"]
    assert gateway["readinessProbe"]["grpc"] == {"port": grpc_port, "service": "readiness"}
    assert gateway["livenessProbe"]["grpc"] == {"port": grpc_port, "service": "liveness"}


def test_gateway_readiness_can_follow_the_workers_or_be_a_tcp_check():
    gateway = container(
        render(set_values={"gateway.readinessProbe.followWorkers": "true"}).one("Deployment", GATEWAY),
        "gateway",
    )
    (grpc_port,) = [p["containerPort"] for p in gateway["ports"] if p["name"] == "grpc"]
    assert gateway["readinessProbe"]["grpc"] == {"port": grpc_port}  # service "": SERVING while a worker is
    assert gateway["livenessProbe"]["grpc"]["service"] == "liveness"  # liveness never follows them
    gateway = container(
        render(
            set_values={"gateway.readinessProbe.type": "tcpSocket", "gateway.livenessProbe.type": "tcpSocket"}
        ).one("Deployment", GATEWAY),
        "gateway",
    )
    assert gateway["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert gateway["livenessProbe"]["tcpSocket"] == {"port": "grpc"}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(
    ("name", "prefix", "kind"),
    [(GATEWAY, "OMNIGATE_GATEWAY_", "gateway"), (WORKER, "OMNIGATE_WORKER_", "worker")],
)
def test_grace_period_exceeds_prestop_plus_drain(profile, name, prefix, kind):
    deployment = render_profile(profile).one("Deployment", name)
    main = container(deployment, kind)
    drain_s = float(env(main)[f"{prefix}GRACE_PERIOD_S"])
    pre_stop_s = main["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain_s > 0 and pre_stop_s > 0
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > pre_stop_s + drain_s


def test_drain_settings_follow_values():
    worker = render(set_values={"worker.drain.graceSeconds": "300"}).one("Deployment", WORKER)
    assert env(container(worker, "worker"))["OMNIGATE_WORKER_GRACE_PERIOD_S"] == "300"
    assert pod_spec(worker)["terminationGracePeriodSeconds"] == 10 + 300 + 15


# -- services and balancing --------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_worker_service_is_headless_and_the_gateway_resolves_it_with_grpc_dns(profile):
    rendered = render_profile(profile)
    service = rendered.one("Service", WORKER)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False
    assert service["spec"]["selector"].items() <= pod_labels(rendered.one("Deployment", WORKER)).items()
    assert not selects(
        {"matchLabels": service["spec"]["selector"]}, pod_labels(rendered.one("Deployment", GATEWAY))
    )
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    gateway_env = env(container(rendered.one("Deployment", GATEWAY), "gateway"))
    assert gateway_env["OMNIGATE_GATEWAY_WORKER_TARGET"] == (
        f"dns:///{WORKER}.{NAMESPACE}.svc.cluster.local:{port['port']}"
    )


def test_gateway_service_exposes_grpc_and_http_ports():
    service = render_profile("default").one("Service", GATEWAY)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["http-metrics"]["port"] == 9400 and ports["http-metrics"]["appProtocol"] == "http"
    # The OpenAI-compatible HTTP API.
    assert ports["http"]["port"] == 8000 and ports["http"]["targetPort"] == "http"
    assert service["spec"].get("clusterIP") != "None"


@pytest.mark.parametrize("profile", PROFILES)
def test_services_listen_on_all_interfaces_on_the_declared_ports(profile):
    for name, kind, prefix in (
        (GATEWAY, "gateway", "OMNIGATE_GATEWAY_"),
        (WORKER, "worker", "OMNIGATE_WORKER_"),
    ):
        main = container(render_profile(profile).one("Deployment", name), kind)
        e = env(main)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert e[f"{prefix}HOST"] == e[f"{prefix}METRICS_HOST"] == "0.0.0.0"
        assert int(e[f"{prefix}PORT"]) == ports["grpc"]
        assert int(e[f"{prefix}METRICS_PORT"]) == ports["http-metrics"]
        if kind == "gateway":
            assert e["OMNIGATE_GATEWAY_HTTP_HOST"] == "0.0.0.0"
            assert int(e["OMNIGATE_GATEWAY_HTTP_PORT"]) == ports["http"]


def test_config_values_become_settings_without_number_mangling():
    rendered = render(
        set_values={"gateway.config.max_decoded_bytes": "1500000000", "worker.config.dtype": "bfloat16"}
    )
    gateway_env = env(container(rendered.one("Deployment", GATEWAY), "gateway"))
    assert gateway_env["OMNIGATE_GATEWAY_MAX_DECODED_BYTES"] == "1500000000"
    assert env(container(rendered.one("Deployment", WORKER), "worker"))["OMNIGATE_WORKER_DTYPE"] == "bfloat16"


# -- autoscaling ---------------------------------------------------------------------------------------------


def _behavior_is_fast_up_slow_down(behavior: dict) -> None:
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    assert up["stabilizationWindowSeconds"] == 0
    assert down["stabilizationWindowSeconds"] >= 300
    assert max(p["value"] for p in up["policies"] if p["type"] == "Percent") >= 100
    assert all(p["value"] <= 1 for p in down["policies"] if p["type"] == "Pods")


def test_worker_hpa_scales_the_worker_on_exported_load_metrics_never_gpu():
    rendered = render_profile("gpu-prod")
    hpa = rendered.one("HorizontalPodAutoscaler", WORKER)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKER}
    rendered.one("Deployment", WORKER)
    assert "replicas" not in rendered.one("Deployment", WORKER)["spec"]  # the HPA owns the replica count
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    assert set(names) == {"omnigate_worker_in_flight_requests", "omnigate_worker_queue_depth"}
    assert set(names) <= WORKER_SERIES
    assert "gpu" not in str(hpa["spec"]["metrics"]).lower() and "dcgm" not in str(hpa).lower()
    _behavior_is_fast_up_slow_down(hpa["spec"]["behavior"])


def test_gateway_hpa_scales_on_cpu_and_in_flight_requests():
    hpa = render_profile("gpu-prod").one("HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["scaleTargetRef"]["name"] == GATEWAY
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert by_type["Resource"]["resource"]["target"]["type"] == "Utilization"
    assert by_type["Pods"]["pods"]["metric"]["name"] == "omnigate_gateway_in_flight_requests"
    assert "omnigate_gateway_in_flight_requests" in GATEWAY_SERIES
    _behavior_is_fast_up_slow_down(hpa["spec"]["behavior"])


def test_prometheus_adapter_rules_expose_every_metric_the_hpas_use():
    import yaml

    from tests.charts.chart import CHART_DIR

    rules = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["prometheusAdapter"]["rules"]
    served = set()
    for rule in rules:
        (series,) = OMNIGATE_METRIC.findall(rule["seriesQuery"])
        assert series in GATEWAY_SERIES | WORKER_SERIES
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert rule["name"] == {"matches": "^(.*)$", "as": "${1}"}  # served under the metric's own name
        served.add(series)
    used = set()
    for hpa in render_profile("gpu-prod").all("HorizontalPodAutoscaler"):
        used |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert used and used <= served


def test_keda_scaled_object_targets_the_worker_with_exported_metrics_and_scales_to_zero():
    rendered = render_profile("keda")
    (scaled,) = rendered.all("ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKER}
    assert spec["minReplicaCount"] == 0
    assert rendered.all("HorizontalPodAutoscaler") == [] or all(
        h["spec"]["scaleTargetRef"]["name"] != WORKER for h in rendered.all("HorizontalPodAutoscaler")
    )
    assert "replicas" not in rendered.one("Deployment", WORKER)["spec"]
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"in-flight", "queue-depth", "gateway-demand"}
    for trigger in triggers.values():
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        names = set(OMNIGATE_METRIC.findall(query))
        assert names and names <= GATEWAY_SERIES | WORKER_SERIES, query
        assert f'namespace="{NAMESPACE}"' in query
        assert isinstance(trigger["metadata"]["threshold"], str)
    assert f'job="{WORKER}"' in triggers["in-flight"]["metadata"]["query"]
    assert "omnigate_worker_in_flight_requests" in triggers["in-flight"]["metadata"]["query"]
    assert "omnigate_worker_queue_depth" in triggers["queue-depth"]["metadata"]["query"]
    demand = triggers["gateway-demand"]["metadata"]
    assert f'job="{GATEWAY}"' in demand["query"] and demand["activationThreshold"] == "0"
    _behavior_is_fast_up_slow_down(spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])


def test_keda_wakes_workers_on_admitted_demand_only_and_falls_back_when_it_is_lost():
    """The wake-up signal counts admitted requests (never refused or unauthenticated calls, which
    omnigate_gateway_requests_total also counts), and a lost signal runs the fallback instead of reading
    as zero demand."""
    (scaled,) = render_profile("keda").all("ScaledObject")
    spec = scaled["spec"]
    demand = {t["name"]: t for t in spec["triggers"]}["gateway-demand"]["metadata"]
    assert set(OMNIGATE_METRIC.findall(demand["query"])) == {"omnigate_gateway_admitted_requests"}
    assert "omnigate_gateway_admitted_requests" in GATEWAY_SERIES
    assert demand["ignoreNullValues"] == "false"
    assert demand["threshold"] == "8"
    assert spec["fallback"] == {"failureThreshold": 3, "replicas": 1}
    tuned = render(
        set_values={
            "worker.keda.enabled": "true",
            "worker.keda.scaleToZero": "true",
            "worker.keda.admittedRequestsPerWorker": "4",
            "worker.keda.fallback.replicas": "2",
            "worker.keda.fallback.failureThreshold": "5",
        }
    )
    (scaled,) = tuned.all("ScaledObject")
    assert scaled["spec"]["fallback"] == {"failureThreshold": 5, "replicas": 2}
    assert {t["name"]: t for t in scaled["spec"]["triggers"]}["gateway-demand"]["metadata"][
        "threshold"
    ] == "4"


def test_keda_without_scale_to_zero_keeps_the_minimum_and_has_no_demand_trigger():
    rendered = render(set_values={"worker.keda.enabled": "true", "worker.autoscaling.minReplicas": "2"})
    (scaled,) = rendered.all("ScaledObject")
    assert scaled["spec"]["minReplicaCount"] == 2
    assert {t["name"] for t in scaled["spec"]["triggers"]} == {"in-flight", "queue-depth"}
    assert "fallback" not in scaled["spec"]  # workers never go to zero: nothing to fall back from


# -- disruption, spreading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["default", "gpu-prod", "keda"])
def test_pdbs_and_topology_spread_select_their_own_pods(profile):
    rendered = render_profile(profile)
    for name, other in ((GATEWAY, WORKER), (WORKER, GATEWAY)):
        labels = pod_labels(rendered.one("Deployment", name))
        pdb = rendered.one("PodDisruptionBudget", name)
        assert selects(pdb["spec"]["selector"], labels)
        assert not selects(pdb["spec"]["selector"], pod_labels(rendered.one("Deployment", other)))
        assert pdb["spec"]["maxUnavailable"] == 1
        constraints = pod_spec(rendered.one("Deployment", name))["topologySpreadConstraints"]
        assert constraints
        for constraint in constraints:
            assert selects(constraint["labelSelector"], labels)
            assert constraint["matchLabelKeys"] == ["pod-template-hash"]


# -- network policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_only_gateways_reach_workers_and_only_prometheus_reaches_metrics(profile):
    rendered = render_profile(profile)
    gateway_labels = pod_labels(rendered.one("Deployment", GATEWAY))
    worker_labels = pod_labels(rendered.one("Deployment", WORKER))
    test_pod = rendered.one("Pod", f"{RELEASE}-omnigate-test")
    policy = rendered.one("NetworkPolicy", WORKER)["spec"]
    assert selects(policy["podSelector"], worker_labels)
    assert not selects(policy["podSelector"], gateway_labels)
    assert policy["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in policy["ingress"]}
    assert set(rules) == {("grpc",), ("http-metrics",)}
    (grpc_peer,) = rules[("grpc",)]
    assert set(grpc_peer) == {"podSelector"}  # same namespace, gateway pods only
    assert selects(grpc_peer["podSelector"], gateway_labels)
    assert not selects(grpc_peer["podSelector"], worker_labels)
    assert not selects(grpc_peer["podSelector"], test_pod["metadata"]["labels"])
    for peer in rules[("http-metrics",)]:
        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    gateway_policy = rendered.one("NetworkPolicy", GATEWAY)["spec"]
    assert selects(gateway_policy["podSelector"], gateway_labels)
    assert not selects(gateway_policy["podSelector"], worker_labels)


def test_restricted_gateway_ingress_still_admits_the_helm_test_pod():
    rendered = render(
        set_values={"networkPolicy.gatewayIngressFrom[0].namespaceSelector.matchLabels.team": "apps"}
    )
    policy = rendered.one("NetworkPolicy", GATEWAY)["spec"]
    (grpc_rule,) = [r for r in policy["ingress"] if r["ports"][0]["port"] == "grpc"]
    test_labels = rendered.one("Pod", f"{RELEASE}-omnigate-test")["metadata"]["labels"]
    assert any("podSelector" in p and selects(p["podSelector"], test_labels) for p in grpc_rule["from"])
    assert {"namespaceSelector": {"matchLabels": {"team": "apps"}}} in grpc_rule["from"]
    assert [p["port"] for p in grpc_rule["ports"]] == ["grpc", "http"]  # the HTTP API: same peers as gRPC


def test_network_policy_can_be_turned_off():
    assert render(set_values={"networkPolicy.enabled": "false"}).all("NetworkPolicy") == []


# -- security --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_every_pod_and_container_is_hardened(profile):
    rendered = render_profile(profile)
    workloads = rendered.all("Deployment") + rendered.all("Pod")
    assert len(workloads) == 3
    for workload in workloads:
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not any("hostPath" in v for v in spec.get("volumes", []))
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in containers(workload):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert not sc.get("privileged")
            if workload["kind"] == "Deployment":
                # A read-only root needs a writable /tmp.
                assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


@pytest.mark.parametrize("profile", PROFILES)
def test_images_come_from_values_and_default_to_the_app_version(profile):
    rendered = render_profile(profile)
    assert (
        container(rendered.one("Deployment", GATEWAY), "gateway")["image"]
        == "ghcr.io/omnigate/omnigate-gateway:0.1.0"
    )
    assert (
        container(rendered.one("Deployment", WORKER), "worker")["image"]
        == "ghcr.io/omnigate/omnigate-worker:0.1.0"
    )
    digest = "sha256:" + "a" * 64
    pinned = render(set_values={"worker.image.digest": digest}).one("Deployment", WORKER)
    assert container(pinned, "worker")["image"] == f"ghcr.io/omnigate/omnigate-worker@{digest}"


# -- monitoring ---------------------------------------------------------------------------------------------


def test_service_monitors_scrape_the_metrics_port_of_each_component():
    rendered = render_profile("gpu-prod")
    for name in (GATEWAY, WORKER):
        monitor = rendered.one("ServiceMonitor", name)
        service = rendered.one("Service", name)
        assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
        other = WORKER if name == GATEWAY else GATEWAY
        assert not selects(monitor["spec"]["selector"], rendered.one("Service", other)["metadata"]["labels"])
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["port"] == "http-metrics" and endpoint["path"] == "/metrics"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_pod_monitors_set_the_same_job_label_as_service_monitors():
    rendered = render(set_values={"metrics.podMonitor.enabled": "true"})
    for name in (GATEWAY, WORKER):
        monitor = rendered.one("PodMonitor", name)
        assert selects(monitor["spec"]["selector"], pod_labels(rendered.one("Deployment", name)))
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "http-metrics"
        assert {"action": "replace", "targetLabel": "job", "replacement": name} in endpoint["relabelings"]


def test_prometheus_rule_alerts_on_exported_metrics():
    (rule,) = render_profile("gpu-prod").all("PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert set(alerts) == {
        "OmnigateGatewayHighErrorRate",
        "OmnigateTimeToFirstOutputSLO",
        "OmnigateWorkerQueueSaturated",
        "OmnigateNoReadyWorkers",
        "OmnigateAutoscalerMetricsUnavailable",
        "OmnigateWorkersLost",
        "OmnigateDemandWithoutWorkers",
    }
    for alert in alerts.values():
        names = set(OMNIGATE_METRIC.findall(alert["expr"]))
        assert names <= GATEWAY_SERIES | WORKER_SERIES, alert["expr"]
        assert alert["labels"]["team"] == "ml-serving"
    # The queue alert knows the worker's queue limit (gpu-prod sets OMNIGATE_WORKER_MAX_QUEUE to 64).
    assert alerts["OmnigateWorkerQueueSaturated"]["expr"].rstrip().endswith(">= 51.2")
    assert f'deployment="{WORKER}"' in alerts["OmnigateNoReadyWorkers"]["expr"]


# -- TLS, helm test, names -----------------------------------------------------------------------------


def test_tls_mounts_the_secrets_and_sets_the_file_settings():
    rendered = render(
        set_values={"tls.enabled": "true", "tls.workerSecretName": "w-tls", "tls.gatewaySecretName": "g-tls"}
    )
    for name, kind, secret, variables in (
        (
            WORKER,
            "worker",
            "w-tls",
            [
                "OMNIGATE_WORKER_TLS_CERT_FILE",
                "OMNIGATE_WORKER_TLS_KEY_FILE",
                "OMNIGATE_WORKER_TLS_CLIENT_CA_FILE",
            ],
        ),
        (
            GATEWAY,
            "gateway",
            "g-tls",
            [
                "OMNIGATE_GATEWAY_WORKER_TLS_CERT_FILE",
                "OMNIGATE_GATEWAY_WORKER_TLS_KEY_FILE",
                "OMNIGATE_GATEWAY_WORKER_TLS_CA_FILE",
            ],
        ),
    ):
        deployment = rendered.one("Deployment", name)
        (volume,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == "tls"]
        assert volume["secret"]["secretName"] == secret
        main = container(deployment, kind)
        (mount,) = [m for m in main["volumeMounts"] if m["name"] == "tls"]
        assert mount["readOnly"] is True
        for variable in variables:
            assert env(main)[variable].startswith(mount["mountPath"] + "/")
    gateway_env = env(container(rendered.one("Deployment", GATEWAY), "gateway"))
    assert gateway_env["OMNIGATE_GATEWAY_WORKER_TLS_SERVER_NAME"] == f"{WORKER}.{NAMESPACE}.svc.cluster.local"


def _health_port(main: dict, variable: str) -> int:
    (port,) = [p["containerPort"] for p in main["ports"] if p["name"] == "grpc-health"]
    assert int(env(main)[variable]) == port
    return port


def test_tls_moves_the_grpc_probes_to_the_plaintext_health_port():
    # Kubelet gRPC probes cannot speak TLS: with TLS on, they check the health-only plaintext port.
    rendered = render(
        set_values={"tls.enabled": "true", "tls.workerSecretName": "w-tls", "tls.gatewaySecretName": "g-tls"}
    )
    worker = container(rendered.one("Deployment", WORKER), "worker")
    health_port = _health_port(worker, "OMNIGATE_WORKER_HEALTH_PORT")
    for probe in ("startupProbe", "readinessProbe"):
        assert worker[probe]["grpc"] == {"port": health_port}, probe
    assert worker["livenessProbe"]["grpc"] == {"port": health_port, "service": "liveness"}
    assert "appProtocol" not in rendered.one("Service", WORKER)["spec"]["ports"][0]  # not h2c any more
    gateway = container(rendered.one("Deployment", GATEWAY), "gateway")  # its public port stays plaintext
    assert "OMNIGATE_GATEWAY_HEALTH_PORT" not in env(gateway)
    (grpc_port,) = [p["containerPort"] for p in gateway["ports"] if p["name"] == "grpc"]
    assert gateway["readinessProbe"]["grpc"] == {"port": grpc_port, "service": "readiness"}


def test_gateway_public_tls_and_api_keys_are_mounted_and_the_helm_test_uses_them():
    rendered = render(
        set_values={
            "gateway.tls.enabled": "true",
            "gateway.tls.secretName": "public-tls",
            "auth.existingSecret": "api-keys",
            "tests.apiKeySecret.name": "test-key",
        }
    )
    deployment = rendered.one("Deployment", GATEWAY)
    gateway = container(deployment, "gateway")
    e = env(gateway)
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    mounts = {m["name"]: m for m in gateway["volumeMounts"]}
    assert volumes["public-tls"]["secret"]["secretName"] == "public-tls"
    for variable in ("OMNIGATE_GATEWAY_TLS_CERT_FILE", "OMNIGATE_GATEWAY_TLS_KEY_FILE"):
        assert e[variable].startswith(mounts["public-tls"]["mountPath"] + "/")
    assert "OMNIGATE_GATEWAY_TLS_CLIENT_CA_FILE" not in e
    health_port = _health_port(gateway, "OMNIGATE_GATEWAY_HEALTH_PORT")
    assert gateway["readinessProbe"]["grpc"] == {"port": health_port, "service": "readiness"}
    assert gateway["livenessProbe"]["grpc"] == {"port": health_port, "service": "liveness"}
    # The keys Secret is a directory mount (subPath mounts never see Secret updates, so no revocation).
    assert volumes["api-keys"]["secret"]["secretName"] == "api-keys"
    assert "subPath" not in mounts["api-keys"] and mounts["api-keys"]["readOnly"] is True
    assert e["OMNIGATE_GATEWAY_API_KEYS_FILE"] == mounts["api-keys"]["mountPath"] + "/api-keys"
    ports = {p["name"]: p for p in rendered.one("Service", GATEWAY)["spec"]["ports"]}
    assert "appProtocol" not in ports["grpc"]  # TLS, not h2c
    assert ports["http"]["appProtocol"] == "https"  # the HTTP API is HTTPS only

    pod = rendered.one("Pod", f"{RELEASE}-omnigate-test")
    (ca_volume,) = pod["spec"]["volumes"]
    assert ca_volume["secret"] == {"secretName": "public-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    (health,) = pod["spec"]["initContainers"]
    (generate,) = pod["spec"]["containers"]
    for c in (health, generate):
        ca_file = c["command"][c["command"].index("--ca-cert") + 1]
        assert ca_file.startswith(c["volumeMounts"][0]["mountPath"] + "/")
    (api_key,) = generate["env"]
    assert api_key["name"] == "OMNIGATE_API_KEY"
    assert api_key["valueFrom"]["secretKeyRef"] == {"name": "test-key", "key": "api-key"}


def test_helm_test_checks_health_then_generates_through_the_gateway_service():
    rendered = render_profile("cpu-dev")
    pod = rendered.one("Pod", f"{RELEASE}-omnigate-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    target = f"{GATEWAY}:{rendered.one('Service', GATEWAY)['spec']['ports'][0]['port']}"
    (health,) = pod["spec"]["initContainers"]
    assert health["command"] == ["omnigate", "--gateway", target, "health"]
    (generate,) = pod["spec"]["containers"]
    assert generate["command"][:4] == ["omnigate", "--gateway", target, "generate"]
    assert generate["command"][generate["command"].index("--max-new-tokens") + 1] == "2"


def test_long_release_names_give_valid_object_names():
    release = "a-very-long-release-name-for-an-omnigate-deployment-x"  # 53 characters: helm's limit
    assert len(release) == 53
    rendered = render(release=release)
    names = {d["metadata"]["name"] for d in rendered.docs}
    overridden = render(set_values={"fullnameOverride": "f" * 63})
    names |= {d["metadata"]["name"] for d in overridden.docs}
    assert all(len(n) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) for n in names), names
    assert any(n.endswith("-worker") for n in names) and any(n.endswith("-gateway") for n in names)
    for d in rendered.docs:
        for value in d["metadata"]["labels"].values():
            assert len(value) <= 63


@pytest.mark.parametrize("profile", PROFILES)
def test_notes_tell_how_to_reach_and_check_the_release(profile):
    args = ["install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--dry-run=client"]
    for f in PROFILES[profile]:
        args += ["-f", str(f)]
    notes = helm(*args).stdout.split("NOTES:", 1)[1]
    assert f"port-forward service/{GATEWAY} 50051:50051" in notes
    assert "grpc.health.v1.Health/Check" in notes
    assert f"helm test {RELEASE} -n {NAMESPACE}" in notes
    assert f"rollout status deployment/{WORKER}" in notes
    assert f"dns:///{WORKER}.{NAMESPACE}.svc.cluster.local:50061" in notes
    assert ("scale" in notes and "KEDA" in notes) == (profile == "keda")


def test_notes_under_gateway_tls_use_tls_and_warn_that_a_proxy_must_speak_it():
    args = ["install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--dry-run=client"]
    tls = ["--set", "gateway.tls.enabled=true", "--set", "gateway.tls.secretName=public-tls"]
    notes = helm(*args, *tls).stdout.split("NOTES:", 1)[1]
    assert "grpcurl -cacert ca.crt" in notes and "-plaintext" not in notes
    assert "curl --cacert ca.crt https://" in notes
    assert "must speak TLS" not in notes
    routed = helm(*args, *tls, "--set", "gateway.ingress.enabled=true", "--set", "tests.enabled=true")
    assert "must speak TLS to it" in routed.stdout.split("NOTES:", 1)[1]
    plain = helm(*args).stdout.split("NOTES:", 1)[1]
    assert "grpcurl -plaintext" in plain and "curl http://" in plain


@pytest.mark.parametrize("profile", PROFILES)
def test_each_component_runs_as_its_own_service_account(profile):
    # An identity for the model store (workload identity on the workers' account) must not reach the
    # gateways, which fetch URLs clients choose; the download Job is the model side, the helm test pod the
    # gateway side.
    rendered = render_profile(profile)
    accounts = {a["metadata"]["name"]: a for a in rendered.all("ServiceAccount")}
    assert set(accounts) == {GATEWAY, WORKER}
    assert pod_spec(rendered.one("Deployment", GATEWAY))["serviceAccountName"] == GATEWAY
    assert pod_spec(rendered.one("Deployment", WORKER))["serviceAccountName"] == WORKER
    for job in rendered.all("Job"):
        assert pod_spec(job)["serviceAccountName"] == WORKER
    for pod in rendered.all("Pod"):
        assert pod_spec(pod)["serviceAccountName"] == GATEWAY
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())


def test_service_account_annotations_go_to_the_model_side_only_or_one_named_account():
    identity = {"iam.gke.io/gcp-service-account": "models@project.iam.gserviceaccount.com"}
    rendered = render(set_values={"serviceAccount.annotations": identity})
    assert rendered.one("ServiceAccount", WORKER)["metadata"]["annotations"] == identity
    assert "annotations" not in rendered.one("ServiceAccount", GATEWAY)["metadata"]
    shared = render(set_values={"serviceAccount.name": "omnigate"})
    (account,) = shared.all("ServiceAccount")
    assert account["metadata"]["name"] == "omnigate"
    for kind, name in (("Deployment", GATEWAY), ("Deployment", WORKER)):
        assert pod_spec(shared.one(kind, name))["serviceAccountName"] == "omnigate"
    existing = render(set_values={"serviceAccount.create": "false"})
    assert existing.all("ServiceAccount") == []
    assert pod_spec(existing.one("Deployment", WORKER))["serviceAccountName"] == "default"
