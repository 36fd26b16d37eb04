"""Builds the worker image on a CPU base (torch included: ~6 GB, minutes) and serves the tiny model from it.

The slowest test of `make test`: measured on 2 cores, ~2.5 min when podman's layer cache holds the
dependency layer, ~4 min without (most of it downloading and unpacking torch and the CUDA wheels).
"""

from __future__ import annotations

import socket
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.images import podman
from tests.support.stack import MODELS_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(podman.missing_reason() is not None, reason=str(podman.missing_reason())),
]

TAG = "localhost/omnigate-worker:test"


def test_worker_image_builds_on_a_cpu_base_and_serves_the_tiny_model():
    podman.ensure_base_image()
    build_s, result = podman.build(
        "Dockerfile.worker", TAG, {"BASE_IMAGE": podman.BASE_IMAGE, "BUILD_IMAGE": podman.BASE_IMAGE}
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    info = podman.inspect(TAG)
    print(f"\nworker image: build {build_s:.0f} s, {info['Size'] / 1e9:.2f} GB")
    assert info["Config"]["User"] == "10001:10001"
    assert info["Config"]["Entrypoint"] == ["/opt/omnigate/bin/omnigate-worker"]

    model = MODELS_DIR / "tiny-qwen2.5-omni"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"omnigate-worker-test-{uuid.uuid4().hex[:8]}"
    try:
        podman.podman(
            "run", "--detach", "--name", name, "--network=host",
            "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
            "-v", f"{model}:/models/tiny-qwen2.5-omni:ro",
            "-e", "HOME=/tmp", "-e", "HF_HUB_OFFLINE=1",
            "-e", "OMNIGATE_WORKER_MODEL=/models/tiny-qwen2.5-omni", "-e", "OMNIGATE_WORKER_DEVICE=cpu",
            "-e", "OMNIGATE_WORKER_HOST=127.0.0.1", "-e", f"OMNIGATE_WORKER_PORT={port}",
            "-e", "OMNIGATE_WORKER_METRICS_PORT=-1",
            TAG,
        )  # fmt: skip
        status = None
        deadline = time.monotonic() + 180
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and status != health_pb2.HealthCheckResponse.SERVING:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError:
                    time.sleep(0.5)
        logs = podman.podman("logs", name, check=False)
        assert status == health_pb2.HealthCheckResponse.SERVING, logs.stdout[-3000:] + logs.stderr[-3000:]
    finally:
        podman.podman("rm", "--force", "--time", "10", name, check=False)
