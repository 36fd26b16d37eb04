"""A request whose client goes away, or whose deadline passes, stops fetching at once (real processes)."""

from __future__ import annotations

import time

import grpc
import pytest

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway(fake_worker, gateway_factory):
    return gateway_factory(
        fake_worker[1],
        {"OMNIGATE_GATEWAY_ALLOW_PRIVATE_NETWORKS": "true", "OMNIGATE_GATEWAY_FETCH_TOTAL_TIMEOUT_S": "60"},
    )


def _request(url: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role="user", content=[pb.ContentPart(image=pb.MediaSource(url=url))])],
        generation_mode=pb.GENERATION_MODE_TEXT,
    )


def _wait_for_hangup(server, path: str, after: float, limit_s: float) -> float:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.hangups.get(path, 0) > after:
            return server.hangups[path] - after
        time.sleep(0.02)
    raise AssertionError(f"the gateway kept fetching {path} for more than {limit_s} s")


def test_client_going_away_stops_the_fetch(gateway, hostile_server):
    with grpc.insecure_channel(gateway.target) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(
            _request(hostile_server.url("/drip?interval=0.05")), timeout=60
        )
        time.sleep(0.5)  # the gateway is reading the dripping body
        cancelled_at = time.monotonic()
        call.cancel()
    assert _wait_for_hangup(hostile_server, "/drip", cancelled_at, 3.0) < 3.0


def test_deadline_stops_the_fetch(gateway, hostile_server):
    started = time.monotonic()
    with grpc.insecure_channel(gateway.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(
                gateway_pb2_grpc.GatewayServiceStub(channel).Generate(
                    _request(hostile_server.url("/stall")), timeout=1.0
                )
            )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_for_hangup(hostile_server, "/stall", started, 4.0) < 4.0


def test_gateway_still_serves_after_cancellations(gateway, hostile_server):
    from tests.support import media_factory as mf

    url = hostile_server.serve("after-cancel.png", mf.make_png(16, 16))
    with grpc.insecure_channel(gateway.target) as channel:
        events = list(gateway_pb2_grpc.GatewayServiceStub(channel).Generate(_request(url), timeout=30))
    assert events[-1].WhichOneof("event") == "summary"
