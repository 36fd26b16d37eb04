"""Readiness, metrics endpoints, shutdown, and the gateway's freedom from torch."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.support.stack import MODELS_DIR, start_service, wait_serving

pytestmark = pytest.mark.slow


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def test_serving_only_after_the_model_is_loaded(tmp_path):
    worker = start_service(
        "worker",
        "omnigate_worker.main",
        {"OMNIGATE_WORKER_MODEL": str(MODELS_DIR / "tiny-qwen2.5-omni")},
        tmp_path,
    )
    gateway = start_service(
        "gateway",
        "omnigate_gateway.main",
        {"OMNIGATE_GATEWAY_WORKER_TARGET": worker.target, "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.2"},
        tmp_path,
    )
    try:
        # The worker listens before it has imported torch and loaded the model (seconds): not ready yet.
        assert _health(worker.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        # Not ready, but alive: the livenessProbe's service (omnigate_worker/liveness.py) says SERVING.
        assert _health(worker.target, "liveness") == health_pb2.HealthCheckResponse.SERVING
        assert _health(gateway.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(gateway.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            request = gateway_pb2.GenerateRequest(
                messages=[gateway_pb2.Message(role="user", content=[gateway_pb2.ContentPart(text="hi")])],
                generation_mode=gateway_pb2.GENERATION_MODE_TEXT,
            )
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no worker is ready" in err.value.details()
            wait_serving(worker)
            wait_serving(gateway)
            assert list(stub.Generate(request, timeout=60))[-1].WhichOneof("event") == "summary"
            assert _health(worker.target, "liveness") == health_pb2.HealthCheckResponse.SERVING

        for service, prefix in ((gateway, "omnigate_gateway_"), (worker, "omnigate_worker_")):
            body = (
                urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5)
                .read()
                .decode()
            )
            names = {
                line.split("{")[0].split(" ")[0] for line in body.splitlines() if line.startswith(prefix)
            }
            assert f"{prefix}requests_total" in names
            assert f"{prefix}request_duration_seconds_bucket" in names
            assert f"{prefix}time_to_first_output_seconds_bucket" in names
            assert f"{prefix}generated_tokens_total" in names
        assert (
            'omnigate_gateway_requests_total{code="UNAVAILABLE",mode="text",rpc="Generate"} 1.0'
            in urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
    finally:
        assert gateway.stop() == 0, gateway.log_tail()
        assert worker.stop() == 0, worker.log_tail()
    assert "worker stopped" in worker.log_tail()


def test_gateway_does_not_import_torch_or_transformers():
    code = (
        "import sys, omnigate_gateway.main, omnigate_gateway.grpc_api.server, omnigate_client.cli;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
