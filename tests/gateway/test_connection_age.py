"""Connection ageing on the gateway's public gRPC port (gRPC A9): a long-lived client connection gets a
GOAWAY after OMNIGATE_GATEWAY_MAX_CONNECTION_AGE_S, and the client's channel reconnects and keeps working
(against a real gateway process; no worker is needed: the calls are health checks)."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate_gateway.grpc_api.server import server_options
from omnigate_gateway.settings import GatewaySettings
from tests.support.stack import start_service


def test_options_follow_the_settings():
    options = dict(server_options(GatewaySettings(max_connection_age_s=120, max_connection_age_grace_s=30)))
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert options["grpc.max_connection_age_grace_ms"] == 30_000
    never = dict(server_options(GatewaySettings(max_connection_age_s=0)))
    assert "grpc.max_connection_age_ms" not in never  # 0 = connections live as long as the client wants
    assert GatewaySettings().max_connection_age_grace_s > GatewaySettings().default_timeout_s


def test_a_long_lived_channel_is_sent_away_after_the_age_and_reconnects(tmp_path):
    gateway = start_service(
        "gateway",
        "omnigate_gateway.main",
        {
            "OMNIGATE_GATEWAY_WORKER_TARGET": "127.0.0.1:1",  # no worker: health answers NOT_SERVING
            "OMNIGATE_GATEWAY_MAX_CONNECTION_AGE_S": "1",
            "OMNIGATE_GATEWAY_MAX_CONNECTION_AGE_GRACE_S": "1",
        },
        tmp_path,
    )
    states: list[grpc.ChannelConnectivity] = []
    changed = threading.Condition()

    def record(state: grpc.ChannelConnectivity) -> None:
        with changed:
            states.append(state)
            changed.notify_all()

    try:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest()
            assert stub.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
            channel.subscribe(record)
            with changed:  # READY now; the GOAWAY after ~1 s (+-10 %) takes the connection down
                assert changed.wait_for(lambda: grpc.ChannelConnectivity.READY in states, timeout=5)
                ready_at = states.index(grpc.ChannelConnectivity.READY)
                assert changed.wait_for(
                    lambda: any(s is not grpc.ChannelConnectivity.READY for s in states[ready_at:]),
                    timeout=10,
                ), states
            # The same channel keeps working: it connects again for the next call, and is aged again.
            for _ in range(3):
                assert stub.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
                time.sleep(0.5)
            with changed:
                assert changed.wait_for(lambda: states.count(grpc.ChannelConnectivity.READY) >= 2, timeout=10)
            channel.unsubscribe(record)
    finally:
        assert gateway.stop() == 0, gateway.log_tail()
