"""Two real workers behind one gateway, all as processes on loopback: failover when a worker is killed
(SIGKILL), hangs (SIGSTOP) or drains (SIGTERM), the gateway's own drain, DNS discovery, no-worker errors,
deadline propagation, and the 60 s soak (bench/soak.py) with a worker killed and restarted.

Streams are made long on purpose (``min_new_tokens`` = ``max_new_tokens``) so that a fault lands in the
middle of them; every test waits until each stream has had its first event before it injects the fault.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from omnigate.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.support.stack import (
    MODELS_DIR,
    REPO_DIR,
    PoolStack,
    Service,
    metric_sum,
    scrape_metrics,
    start_pool_stack,
    start_service,
    wait_serving,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = MODELS_DIR / "tiny-qwen2.5-omni"
LONG = 1000  # tokens: several seconds per stream on the tiny model, so faults land mid-stream
MEDIUM = 1500  # for the drains (the streams only need to outlast the signal, on a loaded 2-core CI machine)
DEADLINE_S = 90.0
# Fast detection for the tests (the defaults are seconds longer): health every 0.3 s answered within 3 s,
# keepalive ping every 2 s answered within 4 s, 2 s to connect, reconnect within 1 s, ejection for 2 s.
# (Tighter values flap on a loaded 2-core machine: a busy worker answers pings and checks late.)
GATEWAY_ENV = {
    "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.3",
    "OMNIGATE_GATEWAY_WORKER_CHECK_TIMEOUT_S": "3",
    "OMNIGATE_GATEWAY_WORKER_KEEPALIVE_TIME_S": "2",
    "OMNIGATE_GATEWAY_WORKER_KEEPALIVE_TIMEOUT_S": "4",
    "OMNIGATE_GATEWAY_WORKER_CONNECT_TIMEOUT_S": "2",
    "OMNIGATE_GATEWAY_WORKER_RECONNECT_BACKOFF_MAX_S": "1",
    "OMNIGATE_GATEWAY_WORKER_EJECTION_S": "2",
    "OMNIGATE_GATEWAY_GRACE_PERIOD_S": "60",
}
WORKER_ENV = {
    "OMNIGATE_WORKER_KEEPALIVE_MIN_PING_INTERVAL_S": "1",  # the gateway pings every 2 s
    "OMNIGATE_WORKER_GRACE_PERIOD_S": "60",
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Iterator[PoolStack]:
    stack = start_pool_stack(
        MODEL, tmp_path_factory.mktemp("failover"), gateway_env=GATEWAY_ENV, worker_env=WORKER_ENV
    )
    yield stack
    stack.stop()


def healthy(pool: PoolStack) -> PoolStack:
    """Both workers running and ready at the gateway (restarts what an earlier test killed or stopped)."""
    for index, worker in enumerate(pool.workers):
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGCONT)
        else:
            pool.restart_worker(index)
    pool.wait_ready(len(pool.workers), timeout_s=60)
    return pool


# ---- streams ---------------------------------------------------------------------------------------


@dataclass
class Stream:
    tokens: int
    started: float = 0.0
    first_event: float | None = None
    ended: float | None = None
    code: grpc.StatusCode | None = None
    details: str = ""
    output_tokens: int = 0


def _request(tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role="user", content=[pb.ContentPart(text="Tell me a long story.")])],
        parameters=pb.GenerationParameters(max_new_tokens=tokens, min_new_tokens=tokens),
        generation_mode=pb.GENERATION_MODE_TEXT,
    )


def _run(stub, stream: Stream, timeout_s: float) -> Stream:
    stream.started = time.monotonic()
    try:
        for event in stub.Generate(_request(stream.tokens), timeout=timeout_s):
            if stream.first_event is None:
                stream.first_event = time.monotonic()
            if event.HasField("summary"):
                stream.output_tokens = event.summary.output_tokens
        stream.code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        stream.code, stream.details = exc.code(), exc.details() or ""
    stream.ended = time.monotonic()
    return stream


class Streams:
    """``n`` concurrent Generate streams through ``gateway``, each on its own thread."""

    def __init__(self, gateway: Service, n: int, tokens: int, timeout_s: float = DEADLINE_S) -> None:
        self.channel = grpc.insecure_channel(gateway.target)
        stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.streams = [Stream(tokens) for _ in range(n)]
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(n)
        self._futures = [self._pool.submit(_run, stub, s, timeout_s) for s in self.streams]

    def wait_all_streaming(self, timeout_s: float = 60.0) -> None:
        """Waits until every stream has had its first event; none may have ended yet."""
        deadline = time.monotonic() + timeout_s
        while any(s.first_event is None for s in self.streams):
            ended = [s for s in self.streams if s.ended is not None]
            assert not ended, f"streams ended before they all started: {[(s.code, s.details) for s in ended]}"
            assert time.monotonic() < deadline, "streams did not start"
            time.sleep(0.02)
        assert all(s.ended is None for s in self.streams), "a stream ended before the fault: make them longer"

    def join(self) -> list[Stream]:
        done = [f.result(timeout=self.timeout_s + 30) for f in self._futures]
        self._pool.shutdown()
        self.channel.close()
        return done


def run_requests(gateway: Service, n: int, tokens: int = 8, timeout_s: float = 30.0) -> list[Stream]:
    """``n`` short requests at once; returns them when all have ended."""
    return Streams(gateway, n, tokens, timeout_s).join()


def ok_count(worker: Service) -> float:
    return metric_sum(scrape_metrics(worker), "omnigate_worker_requests_total", code="OK")


def _describe(streams: list[Stream]) -> list:
    return [(s.code and s.code.name, s.details[:80], s.output_tokens) for s in streams]


# ---- a worker dies, hangs or drains -----------------------------------------------------------------


def test_kill_9_mid_stream_fails_its_streams_fast_and_the_rest_carries_on(pool):
    healthy(pool)
    streams = Streams(pool.gateway, 16, LONG)
    streams.wait_all_streaming()
    victim = pool.workers[0]
    victim.process.kill()  # SIGKILL
    killed = time.monotonic()
    # Requests that start now, before the gateway has noticed, must all succeed on the other worker
    # (one routed to the dead worker fails before any output and is retried).
    after = run_requests(pool.gateway, 8)
    assert [s.code for s in after] == [grpc.StatusCode.OK] * 8, _describe(after)
    assert all(s.output_tokens == 8 for s in after)

    done = streams.join()
    failed = [s for s in done if s.code != grpc.StatusCode.OK]
    completed = [s for s in done if s.code == grpc.StatusCode.OK]
    assert failed, "the killed worker had no streams: balancing is broken"
    assert completed, "the surviving worker's streams should complete"
    for s in failed:  # a prompt error status, never a hang to the deadline
        assert s.code == grpc.StatusCode.UNAVAILABLE, _describe(failed)
        assert s.ended - killed < 10, f"a stream took {s.ended - killed:.1f} s to fail after the kill"
        assert s.output_tokens == 0
    assert all(s.output_tokens == LONG for s in completed)
    assert all(s.ended - s.started < DEADLINE_S for s in done)

    # Restarted on the same port, it takes requests again.
    restarted = pool.restart_worker(0)
    pool.wait_ready(2, timeout_s=60)
    assert ok_count(restarted) == 0
    again = run_requests(pool.gateway, 8)
    assert [s.code for s in again] == [grpc.StatusCode.OK] * 8, _describe(again)
    assert ok_count(restarted) > 0


def test_a_hung_worker_is_detected_by_keepalive(pool):
    healthy(pool)
    streams = Streams(pool.gateway, 16, LONG)
    streams.wait_all_streaming()
    victim = pool.workers[1]
    victim.process.send_signal(signal.SIGSTOP)  # alive, connected, silent
    stopped = time.monotonic()
    try:
        after = run_requests(pool.gateway, 8)
        assert [s.code for s in after] == [grpc.StatusCode.OK] * 8, _describe(after)
        done = streams.join()
        assert pool.gateway_workers()["ready"] == 1  # the hung worker is out
    finally:
        victim.process.send_signal(signal.SIGCONT)
    failed = [s for s in done if s.code != grpc.StatusCode.OK]
    assert failed, "the hung worker had no streams"
    for s in failed:  # keepalive (2 s ping, 4 s timeout) ends them, long before their 90 s deadline
        assert s.code == grpc.StatusCode.UNAVAILABLE, _describe(failed)
        assert s.ended - stopped < 15, f"a stream took {s.ended - stopped:.1f} s to fail after SIGSTOP"
    assert all(s.output_tokens == LONG for s in done if s.code == grpc.StatusCode.OK)
    pool.wait_ready(2, timeout_s=60)  # back once it runs again


def test_sigterm_drains_a_worker_and_new_requests_go_to_the_other(pool):
    healthy(pool)
    victim, other = pool.workers
    other_ok = ok_count(other)
    streams = Streams(pool.gateway, 32, MEDIUM)
    streams.wait_all_streaming()
    in_flight = [metric_sum(scrape_metrics(w), "omnigate_worker_in_flight_requests") for w in (victim, other)]
    assert sum(in_flight) == 32 and in_flight[0] > 0, in_flight
    victim.process.send_signal(signal.SIGTERM)
    _assert_refuses_before_reading(victim)
    after = run_requests(pool.gateway, 8)
    assert [s.code for s in after] == [grpc.StatusCode.OK] * 8, _describe(after)

    done = streams.join()
    assert [s.code for s in done] == [grpc.StatusCode.OK] * 32, _describe(done)
    assert all(s.output_tokens == MEDIUM for s in done)
    assert victim.process.wait(timeout=60) == 0
    assert "worker stopped" in victim.log_tail(200)
    # The other worker served its own share of the 32 and all 8 new requests.
    assert ok_count(other) - other_ok == in_flight[1] + 8


def _assert_refuses_before_reading(worker: Service) -> None:
    """Once a draining worker reports NOT_SERVING it refuses a call before reading its request: the
    request stream here sends its spec and then nothing, so a worker that read it first would hang."""
    with grpc.insecure_channel(worker.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 20
        while (
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        ):
            assert time.monotonic() < deadline, "the worker still reports SERVING after SIGTERM"
            time.sleep(0.05)
        release = threading.Event()

        def requests():
            yield worker_pb2.GenerateRequest(
                spec=worker_pb2.GenerateSpec(
                    messages=[worker_pb2.Message(role="user", content=[worker_pb2.ContentPart(text="Hi")])],
                    parameters=worker_pb2.GenerationParameters(max_new_tokens=4),
                    generation_mode=worker_pb2.GENERATION_MODE_TEXT,
                )
            )
            release.wait(30)  # the stream stays open: its end never comes while the worker is asked

        started = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as err:
                list(worker_pb2_grpc.WorkerServiceStub(channel).Generate(requests(), timeout=20))
        finally:
            release.set()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert "shutting down" in err.value.details()
    assert time.monotonic() - started < 10, "refused at once, not when the request stream ended"


def test_sigterm_drains_the_gateway(pool):
    healthy(pool)
    gateway = start_service(
        "gateway-drained",
        "omnigate_gateway.main",
        {"OMNIGATE_GATEWAY_WORKER_TARGET": ",".join(w.target for w in pool.workers), **GATEWAY_ENV},
        pool.workdir,
    )
    try:
        wait_serving(gateway)
        streams = Streams(gateway, 8, MEDIUM)
        streams.wait_all_streaming()
        gateway.process.send_signal(signal.SIGTERM)
        refused_at = _wait_refused(gateway, timeout_s=10)  # new requests are turned away at once
        done = streams.join()
        assert [s.code for s in done] == [grpc.StatusCode.OK] * 8, _describe(done)
        assert all(s.output_tokens == MEDIUM for s in done)
        assert all(s.ended > refused_at for s in done)  # refusing new work while finishing the old
        assert gateway.process.wait(timeout=30) == 0
    finally:
        gateway.stop()
    assert "gateway stopped" in gateway.log_tail(50)


def _wait_refused(gateway: Service, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            try:
                list(stub.Generate(_request(4), timeout=5))
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    continue  # arrived as the server stopped listening: gRPC cancels such a call
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return time.monotonic()
        time.sleep(0.05)
    raise AssertionError("the draining gateway still took new requests")


# ---- discovery, no workers, deadlines --------------------------------------------------------------


def test_workers_discovered_by_dns_name(pool):
    healthy(pool)
    port = pool.workers[0].grpc_port
    gateway = start_service(
        "gateway-dns",
        "omnigate_gateway.main",
        {"OMNIGATE_GATEWAY_WORKER_TARGET": f"dns:///localhost:{port}", **GATEWAY_ENV},
        pool.workdir,
    )
    try:
        wait_serving(gateway, timeout_s=60)
        done = run_requests(gateway, 2)
        assert [s.code for s in done] == [grpc.StatusCode.OK] * 2, _describe(done)
        assert metric_sum(scrape_metrics(gateway), "omnigate_gateway_workers", state="ready") == 1
    finally:
        gateway.stop()
    assert f"dns:///localhost:{port} resolves to 127.0.0.1" in gateway.log_tail(200)


def test_no_ready_worker_is_unavailable_with_a_clear_message(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    gateway = start_service(
        "gateway-alone",
        "omnigate_gateway.main",
        {"OMNIGATE_GATEWAY_WORKER_TARGET": f"127.0.0.1:{port}", **GATEWAY_ENV},
        tmp_path,
    )
    try:
        time.sleep(1)  # a few health checks
        with grpc.insecure_channel(gateway.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(_request(4), timeout=30))
            assert time.monotonic() - started < 5
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == (
                "no worker is ready yet: 1 not ready (unreachable, loading its model, or serving another "
                "model); retry shortly"
            )
            with pytest.raises(grpc.RpcError) as err:
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert gateway.stop() == 0


def test_the_client_deadline_reaches_the_worker(pool):
    healthy(pool)
    before = [scrape_metrics(w) for w in pool.workers]
    with grpc.insecure_channel(pool.gateway.target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_request(4000), timeout=1.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
    # The worker stopped generating: its stream ended too (cancelled or past its deadline), not after
    # 4000 tokens.
    deadline = time.monotonic() + 10
    while True:
        after = [scrape_metrics(w) for w in pool.workers]
        ended = sum(
            metric_sum(a, "omnigate_worker_requests_total", code=code)
            - metric_sum(b, "omnigate_worker_requests_total", code=code)
            for a, b in zip(after, before, strict=True)
            for code in ("DEADLINE_EXCEEDED", "CANCELLED")
        )
        if ended == 1 and sum(metric_sum(a, "omnigate_worker_in_flight_requests") for a in after) == 0:
            break
        assert time.monotonic() < deadline, (
            "the worker kept generating after the client's deadline",
            ended,
            [metric_sum(a, "omnigate_worker_in_flight_requests") for a in after],
        )
        time.sleep(0.1)
    assert all(
        metric_sum(a, "omnigate_worker_requests_total", code="OK")
        == metric_sum(b, "omnigate_worker_requests_total", code="OK")
        for a, b in zip(after, before, strict=True)
    )


# ---- soak -------------------------------------------------------------------------------------------


@pytest.mark.timeout(420)
def test_soak_60s_with_a_worker_killed_and_restarted(tmp_path):
    """`make soak` for 60 s (kills at 20 s and 40 s): checks the soak's own targets."""
    output = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            "--seconds",
            "60",
            "--kill-every",
            "20",
            "--warmup",
            "10",
            "--output",
            str(output),
        ],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert output.exists(), result.stdout + result.stderr
    soak = json.loads(output.read_text())
    report = json.dumps(soak, indent=1) + result.stdout[-3000:] + result.stderr[-3000:]
    assert len(soak["kills"]) == 2, report
    assert soak["requests"]["by_status"].get("OK", 0) > 100, report
    assert set(soak["requests"]["by_status"]) <= {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED_RETRY"}, report
    assert soak["targets"] == {
        "every_request_ok_or_retriable_within_deadline": True,
        "restarted_worker_took_requests": True,
        "memory_growth_under_10_percent": True,
    }, report
    assert soak["longest_request"]["seconds"] < soak["config"]["deadline_s"] + 1, report
    assert result.returncode == 0, report
    for name in ("gateway", "worker"):
        assert soak["memory"][name]["start_mb"] > 0 and soak["memory"][name]["end_mb"] > 0
