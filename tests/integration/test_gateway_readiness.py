"""A gateway stays in rotation while its workers are down, answering in-band, and leaves it only to drain.

Real processes on loopback: a gateway (its gRPC, HTTP and plaintext health ports) and a tiny-model worker
started and stopped under it. The gateway's three health services (``omnigate_gateway.health``):

- ``""`` follows the workers (SERVING while one is ready);
- ``readiness`` (the chart's readinessProbe) is SERVING from start-up whatever the workers do, and turns
  NOT_SERVING when the drain begins, while an accepted request still finishes;
- ``liveness`` (the chart's livenessProbe) stays SERVING through the drain.

While no worker is ready, a request that reaches the (ready) gateway is answered by it: held until a worker
is, or refused with UNAVAILABLE and a retry delay.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate import status
from omnigate.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.support.stack import MODELS_DIR, Service, start_service, start_worker

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "readiness", "liveness")
HTTP_PATHS = {"": "/health", "readiness": "/health/readiness", "liveness": "/health/liveness"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(text: str = "Hello") -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        messages=[gateway_pb2.Message(role="user", content=[gateway_pb2.ContentPart(text=text)])],
        generation_mode=gateway_pb2.GENERATION_MODE_TEXT,
        parameters=gateway_pb2.GenerationParameters(max_new_tokens=4),
    )


class Probes:
    """The gateway's health as each kind of prober sees it: gRPC on the main port and on the plaintext
    health port (what the kubelet's gRPC probes use under TLS), and HTTP."""

    def __init__(self, gateway: Service, health_port: int) -> None:
        self.gateway = gateway
        self.channels = [
            grpc.insecure_channel(gateway.target),
            grpc.insecure_channel(f"127.0.0.1:{health_port}"),
        ]

    def grpc(self, service: str, health_port_only: bool = False) -> set[int]:
        """The status of ``service`` on every gRPC port (one element when they agree). A draining gateway's
        main port refuses new calls, health checks included, so drain checks ask the health port only (the
        kubelet stops liveness probes once a pod is being deleted, and a refused readiness probe fails)."""
        return {
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
            for channel in (self.channels[1:] if health_port_only else self.channels)
        }

    def http(self, service: str) -> int:
        return httpx.get(
            f"http://127.0.0.1:{self.gateway.http_port}{HTTP_PATHS[service]}", timeout=5
        ).status_code

    def state(self) -> dict[str, tuple[set[int], int]]:
        return {service: (self.grpc(service), self.http(service)) for service in SERVICES}

    def wait(
        self, service: str, expected: int, timeout_s: float = 60, health_port_only: bool = False
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while self.grpc(service, health_port_only) != {expected}:
            assert time.monotonic() < deadline, (service, self.gateway.log_tail())
            time.sleep(0.1)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def _up(code: int) -> tuple[set[int], int]:
    return {code}, 200 if code == SERVING else 503


def _gateway(tmp_path, worker_port: int, wait_for_worker_s: str) -> tuple[Service, Probes]:
    gateway = start_service(
        "gateway",
        "omnigate_gateway.main",
        {
            "OMNIGATE_GATEWAY_WORKER_TARGET": f"127.0.0.1:{worker_port}",
            "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.2",
            "OMNIGATE_GATEWAY_HEALTH_PORT": "0",
            "OMNIGATE_GATEWAY_WAIT_FOR_WORKER_S": wait_for_worker_s,
            "OMNIGATE_GATEWAY_NO_WORKER_RETRY_AFTER_S": "9",
            "OMNIGATE_GATEWAY_GRACE_PERIOD_S": "60",
        },
        tmp_path,
    )
    health_port = json.loads((tmp_path / "gateway.ports.json").read_text())["health_port"]
    probes = Probes(gateway, health_port)
    # The ports file is written once every door listens, and readiness turns SERVING right after.
    probes.wait("readiness", SERVING, timeout_s=10)
    return gateway, probes


def test_a_worker_outage_keeps_the_gateway_ready_and_answering_in_band(tmp_path):
    worker_port = _free_port()
    gateway, probes = _gateway(tmp_path, worker_port, wait_for_worker_s="1")
    worker = None
    try:
        # No worker yet: ready for requests (and alive), though no model can answer.
        assert probes.state() == {"": _up(NOT_SERVING), "readiness": _up(SERVING), "liveness": _up(SERVING)}
        with grpc.insecure_channel(gateway.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            # In-band: the ready gateway answers, after holding the request wait_for_worker_s (1 s).
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(_request(), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
            assert status.retry_after_s(err.value) == pytest.approx(9.0)

            worker = start_worker(MODELS_DIR / "tiny-qwen2.5-omni", tmp_path, "worker", port=worker_port)
            probes.wait("", SERVING)
            assert probes.state() == {"": _up(SERVING), "readiness": _up(SERVING), "liveness": _up(SERVING)}
            assert list(stub.Generate(_request(), timeout=60))[-1].HasField("summary")

            # The worker goes away: "" follows it, readiness does not (every gateway would leave rotation).
            assert worker.stop() == 0, worker.log_tail()
            worker = None
            probes.wait("", NOT_SERVING)
            assert probes.state() == {
                "": _up(NOT_SERVING),
                "readiness": _up(SERVING),
                "liveness": _up(SERVING),
            }
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(_request(), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
            assert status.retry_after_s(err.value) == pytest.approx(9.0)
    finally:
        probes.close()
        if worker is not None:
            worker.stop()
        assert gateway.stop() == 0, gateway.log_tail()


def test_a_draining_gateway_leaves_rotation_stays_alive_and_finishes_what_it_accepted(tmp_path):
    worker_port = _free_port()
    gateway, probes = _gateway(tmp_path, worker_port, wait_for_worker_s="120")
    worker = None
    outcome: dict = {}
    try:
        # A request accepted while no worker is up: it waits at the gateway.
        channel = grpc.insecure_channel(gateway.target)
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        def call() -> None:
            try:
                outcome["responses"] = list(stub.Generate(_request(), timeout=150))
            except grpc.RpcError as exc:
                outcome["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(1.5)
        assert caller.is_alive(), outcome

        gateway.process.send_signal(signal.SIGTERM)
        probes.wait("readiness", NOT_SERVING, timeout_s=10, health_port_only=True)
        # Draining: out of rotation, still alive (a liveness failure now would kill what it is finishing).
        assert probes.grpc("liveness", health_port_only=True) == {SERVING}
        assert probes.grpc("", health_port_only=True) == {NOT_SERVING}
        assert gateway.process.poll() is None

        worker = start_worker(MODELS_DIR / "tiny-qwen2.5-omni", tmp_path, "worker", port=worker_port)
        caller.join(timeout=120)
        assert not caller.is_alive(), "the accepted request did not finish"
        assert "error" not in outcome, (outcome, gateway.log_tail())
        assert outcome["responses"][-1].HasField("summary")
        channel.close()
        assert gateway.process.wait(timeout=60) == 0, gateway.log_tail()
    finally:
        probes.close()
        if worker is not None:
            worker.stop()
        gateway.stop()
