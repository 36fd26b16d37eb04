"""WorkerPool and its calls: least-outstanding picks, retries (only before output), ejection, draining,
model mismatch, DNS discovery and readiness (workers/pool.py, call.py, client.py; worker_target parsing is
in test_targets.py).

The workers here are FAKES: in-process gRPC servers on loopback that answer Generate as a test tells them
to (succeed, fail before or after output, hold the stream open). These tests are about the gateway's
routing decisions; tests/integration/test_failover.py runs the same paths against real workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from omnigate import status
from omnigate.conversation import ContentPart, GenerationRequest, Message, Modality
from omnigate.errors import LimitExceeded, Unavailable
from omnigate.worker.v1 import worker_pb2 as wk
from omnigate.worker.v1 import worker_pb2_grpc
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.settings import GatewaySettings
from omnigate_gateway.workers.client import WORKER_SERVICE
from omnigate_gateway.workers.pool import WorkerPool
from omnigate_gateway.workers.targets import address
from tests.support.waiting import async_wait_until as wait_until

pytestmark = pytest.mark.timeout(60)


class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    """A FAKE worker (no model): serves health, fixed model info, and Generate answers chosen by the test.

    ``behaviour``: ``ok`` (a text delta naming the worker, then a summary), ``unavailable``, ``internal``,
    ``invalid``, ``queue_full`` (RESOURCE_EXHAUSTED with a retry delay), ``too_big`` (RESOURCE_EXHAUSTED
    without one), ``fail_after_output`` (a delta, then UNAVAILABLE), ``hold`` (a delta, then waits for
    ``release``).
    """

    def __init__(self, name: str, model_id: str = "fake-model") -> None:
        self.name = name
        self.model_id = model_id
        self.behaviour = "ok"
        self.calls = 0
        self.release = asyncio.Event()
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def target(self) -> str:
        return address(self.host, self.port)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeWorker:
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.host, self.port = host, self.server.add_insecure_port(f"{host}:{port}")
        await self.server.start()
        await self.serving(True)
        return self

    async def serving(self, serving: bool) -> None:
        state = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(WORKER_SERVICE, state)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)

    async def GetModelInfo(self, request, context):  # noqa: N802 - gRPC method name
        return wk.GetModelInfoResponse(
            model_id=self.model_id,
            architecture="FakeForTests",
            input_modalities=[wk.MODALITY_TEXT],
            output_modalities=[wk.MODALITY_TEXT],
            max_new_tokens=64,
        )

    async def Generate(self, request_iterator, context):  # noqa: N802 - gRPC method name
        async for _ in request_iterator:
            pass
        self.calls += 1
        b = self.behaviour
        if b == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is shutting down")
        if b == "internal":
            await context.abort(grpc.StatusCode.INTERNAL, f"{self.name} is broken")
        if b == "connection_lost":  # the status grpcio's client gives a call whose connection broke
            await context.abort(grpc.StatusCode.INTERNAL, "Internal error from Core")
        if b == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
        if b == "queue_full":
            await status.abort(context, LimitExceeded("the queue is full", retry_after_s=1.0))
        if b == "too_big":
            await status.abort(context, LimitExceeded("the prompt is too long"))
        yield wk.GenerateResponse(text=wk.TextDelta(text=self.name))
        if b == "fail_after_output":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} died mid-stream")
        if b == "hold":
            await self.release.wait()
        yield wk.GenerateResponse(
            summary=wk.Summary(finish_reason=wk.FINISH_REASON_LENGTH, prompt_tokens=1, output_tokens=1)
        )


def request() -> GenerationRequest:
    return GenerationRequest(messages=[Message("user", [ContentPart(Modality.TEXT, text="hi")])])


def pool_settings(**overrides) -> GatewaySettings:
    values = {
        "worker_check_interval_s": 0.05,
        "worker_check_timeout_s": 1.0,
        "worker_discovery_interval_s": 0.05,
        "worker_connect_timeout_s": 1.0,
        "worker_reconnect_backoff_max_s": 0.2,
        **overrides,
    }
    return GatewaySettings(**values)


@contextlib.asynccontextmanager
async def running_pool(target: str, ready: int, resolve=None, **overrides):
    metrics = GatewayMetrics(CollectorRegistry())
    pool = WorkerPool(pool_settings(worker_target=target, **overrides), metrics, resolve=resolve)
    pool.start()
    try:
        await wait_until(lambda: pool.counts()["ready"] == ready, what=f"{ready} ready workers")
        yield pool, metrics
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def fakes(*names: str, **kwargs):
    workers = [await FakeWorker(name, **kwargs).start() for name in names]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.release.set()
            await worker.stop()


def targets(*workers: FakeWorker) -> str:
    return ",".join(w.target for w in workers)


async def generate(pool: WorkerPool, timeout_s: float = 10.0) -> list[str]:
    call = pool.generate(request(), timeout_s)
    try:
        return [event.text.text async for event in call if event.HasField("text")]
    finally:
        call.cancel()


@contextlib.contextmanager
def first_choice(pool: WorkerPool, fake: FakeWorker):
    """Makes ``fake`` the least busy worker (the others look busier) while the block runs."""
    others = [w for w in pool.workers() if w.target != fake.target]
    for w in others:
        w.outstanding += 100
    try:
        yield
    finally:
        for w in others:
            w.outstanding -= 100


def sample(metrics: GatewayMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# ---- picking ----------------------------------------------------------------------------------------


async def test_pick_prefers_the_least_outstanding_with_random_ties():
    async with fakes("a", "b", "c") as (a, b, c), running_pool(targets(a, b, c), ready=3) as (pool, _):
        by_target = {w.target: w for w in pool.workers()}
        by_target[a.target].outstanding = 2
        picked = {pool.pick().target for _ in range(200)}
        assert picked == {b.target, c.target}  # both of the least busy, never the busier one
        by_target[c.target].outstanding = 1
        assert {pool.pick().target for _ in range(50)} == {b.target}
        assert pool.pick(exclude={b.target}).target == c.target
        for w in by_target.values():
            w.outstanding = 0


async def test_concurrent_streams_spread_evenly():
    async with fakes("a", "b") as (a, b), running_pool(targets(a, b), ready=2) as (pool, _):
        a.behaviour = b.behaviour = "hold"
        calls = [pool.generate(request(), 10) for _ in range(6)]
        for call in calls:
            assert (await call.__anext__()).HasField("text")
        assert (a.calls, b.calls) == (3, 3)
        assert sorted(w.outstanding for w in pool.workers()) == [3, 3]
        a.release.set()
        b.release.set()
        for call in calls:
            assert [e async for e in call][-1].HasField("summary")
        assert [w.outstanding for w in pool.workers()] == [0, 0]


# ---- retries ---------------------------------------------------------------------------------------


async def test_failure_before_output_is_retried_on_another_worker():
    async with fakes("a", "b") as (a, b), running_pool(targets(a, b), ready=2) as (pool, metrics):
        a.behaviour = "unavailable"
        with first_choice(pool, a):
            assert await generate(pool) == ["b"]
        assert (a.calls, b.calls) == (1, 1)
        assert sample(metrics, "omnigate_gateway_upstream_retries_total") == 1
        assert sample(metrics, "omnigate_gateway_upstream_errors_total", code="UNAVAILABLE") == 1


async def test_failure_after_output_is_not_retried():
    async with fakes("a", "b") as (a, b), running_pool(targets(a, b), ready=2) as (pool, metrics):
        a.behaviour = "fail_after_output"
        texts = []
        with first_choice(pool, a), pytest.raises(grpc.RpcError) as err:
            async for event in pool.generate(request(), 10):
                texts.append(event.text.text)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert texts == ["a"]  # what reached the caller is never sent again
        assert b.calls == 0
        assert sample(metrics, "omnigate_gateway_upstream_retries_total") == 0


async def test_only_retriable_failures_are_retried():
    async with (
        fakes("a", "b") as (a, b),
        running_pool(targets(a, b), ready=2, worker_eject_after_failures=100) as (
            pool,
            _,
        ),  # no ejection here
    ):
        a.behaviour = "queue_full"  # RESOURCE_EXHAUSTED with a retry delay: another worker may have room
        with first_choice(pool, a):
            assert await generate(pool) == ["b"]
        a.behaviour = "connection_lost"  # the worker went away while the request was being sent
        with first_choice(pool, a):
            assert await generate(pool) == ["b"]
        # a is suspect (no new requests) until its health check, triggered at once, says it is back
        await wait_until(lambda: pool.counts()["ready"] == 2, what="a's health recheck")
        for behaviour, code in (
            ("too_big", grpc.StatusCode.RESOURCE_EXHAUSTED),  # no retry delay: retrying cannot help
            ("invalid", grpc.StatusCode.INVALID_ARGUMENT),
            ("internal", grpc.StatusCode.INTERNAL),
        ):
            a.behaviour, calls_b = behaviour, b.calls
            with first_choice(pool, a), pytest.raises(grpc.RpcError) as err:
                await generate(pool)
            assert err.value.code() == code
            assert b.calls == calls_b, behaviour


async def test_retries_are_bounded():
    async with (
        fakes("a", "b", "c") as workers,
        running_pool(targets(*workers), ready=3, worker_max_retries=1) as (pool, metrics),
    ):
        for w in workers:
            w.behaviour = "unavailable"
        with pytest.raises(grpc.RpcError) as err:
            await generate(pool)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sum(w.calls for w in workers) == 2  # the first attempt and one retry
        assert sample(metrics, "omnigate_gateway_upstream_retries_total") == 1


async def test_the_deadline_applies_to_the_worker_call():
    async with fakes("a", "b") as (a, b), running_pool(targets(a, b), ready=2) as (pool, _):
        a.behaviour = b.behaviour = "hold"
        call = pool.generate(request(), 0.3)
        with pytest.raises(grpc.RpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the deadline reached the worker call
        assert a.calls + b.calls == 1


# ---- worker states --------------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", ["connection_lost", "unavailable", "queue_full"])
async def test_failing_worker_is_ejected_for_a_while(behaviour):
    """Faults of the worker (gone, refusing work, out of room) count toward ejection.

    The ejection lasts 3 s: long enough that the five calls below all fall inside it on a loaded machine
    (0.5 s did not, about one run in four), short enough to wait for its end."""
    async with (
        fakes("a", "b") as (a, b),
        running_pool(targets(a, b), ready=2, worker_eject_after_failures=2, worker_ejection_s=3.0) as (
            pool,
            metrics,
        ),
    ):
        a.behaviour = behaviour
        for _ in range(2):
            # both ready before each call, so that the call goes to a (a loaded CI machine once had a's health
            # check late between the two calls, and the second went to b)
            await wait_until(lambda: pool.counts()["ready"] == 2, what="both workers ready")
            with first_choice(pool, a):
                with contextlib.suppress(grpc.RpcError):  # retried on b when retriable
                    await generate(pool)
        assert a.calls == 2
        assert pool.counts()["ejected"] == 1
        await wait_until(lambda: sample(metrics, "omnigate_gateway_workers", state="ejected") == 1)
        a.behaviour = "ok"
        with first_choice(pool, a):
            for _ in range(5):
                assert await generate(pool) == ["b"]
        assert a.calls == 2
        await wait_until(lambda: pool.counts()["ready"] == 2, what="the ejection to end")


@pytest.mark.parametrize("behaviour", ["internal", "invalid", "too_big"])
async def test_answers_to_one_request_never_eject_a_worker(behaviour):
    """An error answer (bad input, a prompt over the limit, even a bug hit by one request's content) is the
    request's outcome: a client sending bad requests cannot take a worker out of service."""
    async with (
        fakes("a", "b") as (a, b),
        running_pool(targets(a, b), ready=2, worker_eject_after_failures=2, worker_ejection_s=30) as (
            pool,
            _,
        ),
    ):
        a.behaviour = behaviour
        for _ in range(10):
            with first_choice(pool, a), pytest.raises(grpc.RpcError):
                await generate(pool)
        assert pool.counts() == {**pool.counts(), "ready": 2, "ejected": 0}
        a.behaviour = "ok"
        with first_choice(pool, a):
            assert await generate(pool) == ["a"]


async def test_the_last_ready_worker_is_never_ejected():
    """Ejection would only turn a degraded service into no service when no other worker is ready."""
    async with (
        fakes("a") as (a,),
        running_pool(targets(a), ready=1, worker_eject_after_failures=1) as (pool, _),
    ):
        a.behaviour = "queue_full"
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                await generate(pool)
        assert pool.counts()["ejected"] == 0
        a.behaviour = "ok"
        assert await generate(pool) == ["a"]


async def test_draining_worker_finishes_its_calls_and_gets_no_new_ones():
    async with fakes("a", "b") as (a, b), running_pool(targets(a, b), ready=2) as (pool, metrics):
        a.behaviour = "hold"
        with first_choice(pool, a):
            held = pool.generate(request(), 10)
            assert (await held.__anext__()).text.text == "a"
        await a.serving(False)  # what SIGTERM does to a worker
        await wait_until(lambda: pool.counts()["draining"] == 1, what="draining")
        assert sample(metrics, "omnigate_gateway_workers", state="draining") == 1
        with first_choice(pool, a):
            for _ in range(3):
                assert await generate(pool) == ["b"]
        a.release.set()
        assert [e async for e in held][-1].HasField("summary")  # the call in flight completes
        assert a.calls == 1


async def test_worker_serving_another_model_gets_no_requests(caplog):
    async with fakes("a", "b") as (a, b), fakes("odd", model_id="another-model") as (odd,):
        with caplog.at_level(logging.ERROR, logger="omnigate_gateway.workers.pool"):
            async with running_pool(targets(a, odd, b), ready=2) as (pool, _):
                await wait_until(lambda: pool.counts()["not_ready"] == 1)
                with first_choice(pool, odd):
                    for _ in range(4):
                        assert await generate(pool) in (["a"], ["b"])
                assert pool.require_info().model_id == "fake-model"
        assert odd.calls == 0
        assert "serves another-model but the other workers serve fake-model" in caplog.text


async def test_no_ready_worker_is_unavailable_with_a_clear_message():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    async with running_pool(f"127.0.0.1:{port}", ready=0) as (pool, metrics):
        await wait_until(lambda: pool.counts()["not_ready"] == 1)
        with pytest.raises(Unavailable, match="no worker is ready yet: 1 not ready \\(unreachable, loading"):
            await generate(pool)
        with pytest.raises(Unavailable, match="no worker is ready"):
            pool.require_info()
        assert pool.info is None
        assert sample(metrics, "omnigate_gateway_workers", state="not_ready") == 1


async def test_readiness_follows_the_workers():
    async with fakes("a") as (a,):
        async with running_pool(a.target, ready=1) as (pool, _):
            changes = pool.watch_ready()
            assert await anext(changes) is True
            await a.stop()
            assert await asyncio.wait_for(anext(changes), 5) is False
            await a.start(port=a.port)  # back on the same port (a restarted worker)
            assert await asyncio.wait_for(anext(changes), 10) is True
            assert await generate(pool) == ["a"]


async def test_wait_for_info_holds_until_a_worker_is_ready_else_refuses_with_a_retry_delay():
    """A cold start: the request waits for the worker that comes up; with none, it is refused after the
    wait with the retry delay it was given."""
    async with fakes("a") as (a,):
        async with running_pool(a.target, ready=1) as (pool, _):
            changes = pool.watch_ready()
            assert await anext(changes) is True
            await a.stop()
            assert await asyncio.wait_for(anext(changes), 5) is False
            started = time.monotonic()
            with pytest.raises(Unavailable, match="no worker is ready") as refused:
                await pool.wait_for_info(0.3, retry_after_s=42.0)
            assert refused.value.retry_after_s == 42.0
            assert time.monotonic() - started >= 0.3
            waiting = asyncio.create_task(pool.wait_for_info(20, retry_after_s=42.0))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            await a.start(port=a.port)
            info = await asyncio.wait_for(waiting, 10)
            assert info is pool.info and info is not None
            assert await pool.wait_for_info(0, retry_after_s=1.0) is info  # ready: no wait


# ---- DNS discovery --------------------------------------------------------------------------------


class FakeResolver:
    """A FAKE DNS: answers each name from ``answers`` (a list of addresses, or an exception to raise)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str] | Exception] = {}
        self.calls = 0  # questions asked

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        answer = self.answers[host]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


async def _same_port_fakes() -> tuple[FakeWorker, FakeWorker]:
    """Two fake workers on 127.0.0.2 and 127.0.0.3 with one port, as pods behind a headless Service."""
    for _ in range(20):
        first = await FakeWorker("pod-2").start("127.0.0.2")
        try:
            return first, await FakeWorker("pod-3").start("127.0.0.3", first.port)
        except RuntimeError:  # that port is taken on 127.0.0.3: try another
            await first.stop()
    raise RuntimeError("no port free on both 127.0.0.2 and 127.0.0.3")


async def test_dns_discovery_follows_the_answers():
    first, second = await _same_port_fakes()
    dns = FakeResolver()
    dns.answers["workers.test"] = ["127.0.0.2"]
    try:
        async with running_pool(f"dns:///workers.test:{first.port}", ready=1, resolve=dns) as (pool, _):
            dns.answers["workers.test"] = ["127.0.0.2", "127.0.0.3"]  # a pod became ready
            await wait_until(lambda: pool.counts()["ready"] == 2, what="the second pod")
            first.behaviour = second.behaviour = "hold"
            calls = [pool.generate(request(), 10) for _ in range(2)]
            assert sorted([(await call.__anext__()).text.text for call in calls]) == ["pod-2", "pod-3"]

            dns.answers["workers.test"] = ["127.0.0.2"]  # pod-3 is going away (preStop)
            await wait_until(lambda: len(pool.workers()) == 1, what="pod-3 to leave")
            first.release.set()
            second.release.set()
            for call in calls:  # its call in flight still completes
                assert [e async for e in call][-1].HasField("summary")
            first.behaviour = second.behaviour = "ok"
            for _ in range(3):
                assert await generate(pool) == ["pod-2"]

            dns.answers["workers.test"] = socket.gaierror(socket.EAI_AGAIN, "temporary failure")
            asked = dns.calls
            await wait_until(lambda: dns.calls >= asked + 2, what="the pool to meet the hiccup twice")
            assert pool.counts()["ready"] == 1  # a resolver hiccup keeps the workers we know
            dns.answers["workers.test"] = socket.gaierror(socket.EAI_NONAME, "no such name")
            await wait_until(lambda: not pool.workers(), what="the name to vanish")
            with pytest.raises(Unavailable, match=f"none found at dns:///workers.test:{first.port}"):
                await generate(pool)
    finally:
        await first.stop()
        await second.stop()
