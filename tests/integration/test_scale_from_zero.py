"""Scale from zero against real processes: with no worker up, an admitted request waits at the gateway and
succeeds once a worker starts (within its deadline); refused and unauthenticated traffic never moves the
wake-up signal (``omnigate_gateway_admitted_requests``); a wait that ends without a worker is refused with
a retry delay the SDK honours."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from omnigate import status
from omnigate.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from omnigate_client import OmnigateClient
from omnigate_client.types import Summary
from tests.support.stack import (
    MODELS_DIR,
    Service,
    metric_sum,
    scrape_metrics,
    start_service,
    start_worker,
)

pytestmark = pytest.mark.slow

KEY = "test-secret-0123456789"
ADMITTED = "omnigate_gateway_admitted_requests"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def _gateway(tmp_path, worker_port: int, **env: str) -> Service:
    keys = tmp_path / "api-keys"
    keys.write_text(f"tests:{KEY}\n")
    gateway = start_service(
        "gateway",
        "omnigate_gateway.main",
        {
            "OMNIGATE_GATEWAY_WORKER_TARGET": f"127.0.0.1:{worker_port}",
            "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.2",
            "OMNIGATE_GATEWAY_API_KEYS_FILE": str(keys),
            **env,
        },
        tmp_path,
    )
    # Up (listening, metrics served) though not SERVING: no worker is ready.
    deadline = time.monotonic() + 30
    while True:
        try:
            scrape_metrics(gateway)
            return gateway
        except OSError:
            assert time.monotonic() < deadline, gateway.log_tail()
            time.sleep(0.1)


def _admitted(gateway: Service) -> float:
    return metric_sum(scrape_metrics(gateway), ADMITTED)


def _wait_for(condition, timeout_s: float, why: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


def test_a_request_waits_for_a_worker_that_starts_and_succeeds_within_its_deadline(tmp_path):
    worker_port = _free_port()
    gateway = _gateway(tmp_path, worker_port, OMNIGATE_GATEWAY_WAIT_FOR_WORKER_S="120")
    worker = None
    outcome: dict = {}
    try:
        client = OmnigateClient(gateway.target, api_key=KEY, timeout_s=180)

        def call() -> None:
            started = time.monotonic()
            try:
                outcome["events"] = list(client.generate(_user("Hello"), max_new_tokens=4))
            except Exception as exc:  # noqa: BLE001 - reported by the assertions below
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - started

        caller = threading.Thread(target=call)
        caller.start()
        # The request is admitted demand while it waits: what wakes scaled-to-zero workers.
        _wait_for(lambda: _admitted(gateway) == 1, 30, "the waiting request is not counted as demand")
        time.sleep(1)
        assert caller.is_alive() and "error" not in outcome, outcome  # still waiting, not refused
        worker = start_worker(MODELS_DIR / "tiny-qwen2.5-omni", tmp_path, "worker", port=worker_port)
        caller.join(timeout=170)
        assert not caller.is_alive(), "the request did not finish"
        assert "error" not in outcome, (outcome, gateway.log_tail())
        assert isinstance(outcome["events"][-1], Summary)
        assert outcome["seconds"] < 180
        client.close()
        assert _admitted(gateway) == 0
        samples = scrape_metrics(gateway)
        assert metric_sum(samples, "omnigate_gateway_requests_total", rpc="Generate", code="OK") == 1
        assert metric_sum(samples, "omnigate_gateway_requests_total", code="UNAVAILABLE") == 0
    finally:
        assert gateway.stop() == 0, gateway.log_tail()
        if worker is not None:
            worker.stop()


def test_refused_traffic_is_not_demand_and_a_wait_without_a_worker_ends_with_a_retry_delay(tmp_path):
    gateway = _gateway(
        tmp_path,
        _free_port(),  # nothing listens there
        OMNIGATE_GATEWAY_WAIT_FOR_WORKER_S="2",
        OMNIGATE_GATEWAY_NO_WORKER_RETRY_AFTER_S="7",
    )
    try:
        request = gateway_pb2.GenerateRequest(
            messages=[gateway_pb2.Message(role="user", content=[gateway_pb2.ContentPart(text="hi")])],
            generation_mode=gateway_pb2.GENERATION_MODE_TEXT,
        )
        invalid = gateway_pb2.GenerateRequest(generation_mode=gateway_pb2.GENERATION_MODE_TEXT)  # no messages
        with grpc.insecure_channel(gateway.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            auth = (("authorization", f"Bearer {KEY}"),)
            refused = [
                (request, (), grpc.StatusCode.UNAUTHENTICATED),
                (
                    request,
                    (("authorization", "Bearer wrong-key-0123456789"),),
                    grpc.StatusCode.UNAUTHENTICATED,
                ),
                (invalid, auth, grpc.StatusCode.INVALID_ARGUMENT),
            ]
            for _ in range(5):
                for message, metadata, code in refused:
                    started = time.monotonic()
                    with pytest.raises(grpc.RpcError) as err:
                        list(stub.Generate(message, metadata=metadata, timeout=30))
                    assert err.value.code() == code, err.value
                    assert time.monotonic() - started < 1.5  # refused at once: never held for a worker
            assert _admitted(gateway) == 0
            samples = scrape_metrics(gateway)
            assert metric_sum(samples, "omnigate_gateway_requests_total", rpc="Generate") == 15

            # An admitted request waits wait_for_worker_s (2 s here) for a worker, then is refused with
            # the cold start's retry delay; it counts as demand only while it waits.
            waited: dict = {}

            def call() -> None:
                started = time.monotonic()
                try:
                    list(stub.Generate(request, metadata=auth, timeout=30))
                except grpc.RpcError as exc:
                    waited["error"] = exc
                waited["seconds"] = time.monotonic() - started

            caller = threading.Thread(target=call)
            caller.start()
            _wait_for(lambda: _admitted(gateway) == 1 or not caller.is_alive(), 10, "no demand seen")
            caller.join(timeout=20)
            error = waited["error"]
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert "no worker is ready" in error.details()
            assert status.retry_after_s(error) == pytest.approx(7.0)
            assert 1.8 <= waited["seconds"] < 10
            assert _admitted(gateway) == 0

            # Never past the caller's deadline: with 1 s left, the refusal comes before it.
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, metadata=auth, timeout=1.0))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
            assert time.monotonic() - started < 1.0

        # The SDK waits the retry delay, within its deadline: a call whose deadline leaves no room for it
        # is not retried; one with room retries after about 7 s.
        with OmnigateClient(gateway.target, api_key=KEY) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(client.generate(_user("hi"), timeout_s=5, retries=3))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.retry_after == pytest.approx(7.0)  # type: ignore[attr-defined]
            assert time.monotonic() - started < 5
            stream = client.generate(_user("hi"), timeout_s=14, retries=1)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError):
                list(stream)
            assert stream.attempts == 2  # type: ignore[attr-defined]
            assert time.monotonic() - started >= 2 + 7 + 1.5  # a wait, the delay, part of a second wait
    finally:
        assert gateway.stop() == 0, gateway.log_tail()
