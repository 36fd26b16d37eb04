"""Builds the gateway image with podman from a locally bootstrapped base, runs it, and talks to it.

The container runs the way the chart runs it (numeric user, read-only root filesystem, no capabilities)
with host networking, bound to 127.0.0.1 only. A real worker runs on the host with the tiny model, so the
containerised gateway reaches SERVING and streams a generation end to end.
"""

from __future__ import annotations

import socket
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate_client import OmnigateClient, TextDelta
from tests.images import podman
from tests.support.stack import MODELS_DIR, start_service, wait_serving

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(podman.missing_reason() is not None, reason=str(podman.missing_reason())),
]

TAG = "localhost/omnigate-gateway:test"


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def _listen_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on a port of this host."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway_image(record_testsuite_property):
    base_s = podman.ensure_base_image()
    build_s, result = podman.build("Dockerfile.gateway", TAG, {"BASE_IMAGE": podman.BASE_IMAGE})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    info = podman.inspect(TAG)
    size_mb = info["Size"] / 1e6
    print(f"\ngateway image: base {base_s:.0f} s, build {build_s:.0f} s, {size_mb:.0f} MB")
    record_testsuite_property("gateway_image_build_s", round(build_s, 1))
    record_testsuite_property("gateway_image_size_mb", round(size_mb))
    return info


def test_image_runs_as_a_numeric_user_with_an_exec_entrypoint(gateway_image):
    config = gateway_image["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/opt/omnigate/bin/omnigate-gateway"]
    assert {"50051/tcp", "9400/tcp"} <= set(config.get("ExposedPorts", {}))


def test_image_has_no_torch_and_no_weights(gateway_image):
    result = podman.podman(
        "run",
        "--rm",
        "--network=none",
        "--entrypoint",
        "/opt/omnigate/bin/python",
        TAG,
        "-c",
        "import importlib.util as u, pathlib;"
        "print(u.find_spec('torch') is None, u.find_spec('transformers') is None, u.find_spec('av') is not None);"
        "print(sum(1 for p in pathlib.Path('/opt').rglob('*') if p.suffix in ('.safetensors', '.bin', '.gguf')))",
    )
    assert result.stdout.split() == ["True", "True", "True", "0"], result.stdout + result.stderr


def test_gateway_container_serves_health_and_generation_on_loopback(gateway_image, tmp_path):
    model = MODELS_DIR / "tiny-qwen2.5-omni"
    if not (model / "config.json").exists():
        pytest.skip(f"{model} is missing: run `make models`")
    worker = start_service("worker", "omnigate_worker.main", {"OMNIGATE_WORKER_MODEL": str(model)}, tmp_path)
    name = f"omnigate-gateway-test-{uuid.uuid4().hex[:8]}"
    grpc_port, metrics_port = _free_port(), _free_port()
    try:
        wait_serving(worker)
        podman.podman(
            "run", "--detach", "--name", name, "--network=host",
            "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
            "-e", "OMNIGATE_GATEWAY_HOST=127.0.0.1",
            "-e", f"OMNIGATE_GATEWAY_PORT={grpc_port}",
            "-e", "OMNIGATE_GATEWAY_METRICS_HOST=127.0.0.1",
            "-e", f"OMNIGATE_GATEWAY_METRICS_PORT={metrics_port}",
            "-e", "OMNIGATE_GATEWAY_HTTP_HOST=127.0.0.1",
            "-e", f"OMNIGATE_GATEWAY_HTTP_PORT={_free_port()}",
            # gRPC's DNS resolver, as the chart sets it (dns:///<headless service>:<port>).
            "-e", f"OMNIGATE_GATEWAY_WORKER_TARGET=dns:///localhost:{worker.grpc_port}",
            "-e", "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S=0.5",
            TAG,
        )  # fmt: skip
        target = f"127.0.0.1:{grpc_port}"
        status = None
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        logs = podman.podman("logs", name, check=False)
        assert status == health_pb2.HealthCheckResponse.SERVING, logs.stdout + logs.stderr
        with OmnigateClient(target) as client:
            events = list(
                client.generate(
                    [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], max_new_tokens=3
                )
            )
        assert any(isinstance(e, TextDelta) for e in events)
        # The helm test pod runs exactly this, from the gateway image.
        health = podman.podman(
            "run", "--rm", "--network=host", "--read-only", "--cap-drop=ALL", "--entrypoint", "omnigate",
            TAG, "--gateway", target, "health", check=False,
        )  # fmt: skip
        assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr
        # Bound to loopback only, as asked: every listening socket on the port has a loopback address.
        addresses = _listen_addresses(grpc_port)
        assert addresses and addresses <= LOOPBACK, addresses
    finally:
        podman.podman("rm", "--force", "--time", "5", name, check=False)
        worker.stop()
    assert not podman.podman("container", "exists", name, check=False).returncode == 0
