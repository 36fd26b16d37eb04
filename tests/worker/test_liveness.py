"""Worker liveness (``liveness.py``): the ``liveness`` health service turns NOT_SERVING when the engine is
dead (a device error poisoned it, or its thread ended), and stays SERVING through ordinary request failures.
The engine is a FAKE (control flow only): a real CUDA fault cannot be caused on purpose here."""

from __future__ import annotations

import asyncio

import pytest
from grpc_health.v1 import health, health_pb2

from omnigate_worker import liveness
from tests.support.fake_engine import FakeRecordingEngine
from tests.support.waiting import async_wait_until
from tests.worker.test_scheduler import _finish, _request, _scheduler

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("message", "fatal"),
    [
        ("CUDA error: an illegal memory access was encountered", True),
        ("CUDA error: device-side assert triggered", True),
        ("CUDA error: unspecified launch failure", True),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", False),  # the next, smaller step may fit
        ("the fake model cannot generate audio", False),
    ],
)
def test_which_errors_kill_the_engine(message, fatal):
    assert liveness.is_fatal_device_error(RuntimeError(message)) is fatal


@pytest.mark.parametrize(
    ("error", "dead"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (ValueError("a bug in one step"), False),
    ],
)
async def test_a_device_error_in_a_decode_step_marks_the_engine_dead(error, dead):
    engine = FakeRecordingEngine()

    def step() -> None:
        raise error

    engine.batch.step = step  # type: ignore[method-assign]
    scheduler = _scheduler(engine)
    try:
        assert scheduler.dead() is None
        with pytest.raises(Exception):  # noqa: B017 - the request fails whatever the error
            await _finish(scheduler.submit(_request("A")))
        assert (scheduler.dead() is not None) is dead
        if dead:
            assert "illegal memory access" in scheduler.dead()  # type: ignore[operator]
    finally:
        scheduler.shutdown()
    assert (scheduler.dead() is not None) is dead  # a stopped engine is not dead by itself


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash, on purpose
async def test_an_engine_thread_that_ended_is_dead():
    engine = FakeRecordingEngine()

    def broken():  # type: ignore[no-untyped-def]
        raise RuntimeError("the engine loop crashed")

    engine.open_batch = broken  # type: ignore[method-assign]
    scheduler = _scheduler(engine)
    await async_wait_until(lambda: scheduler.dead() is not None, what="the engine thread to end")
    assert scheduler.dead() == "the engine thread ended"
    scheduler.shutdown()


async def test_watch_turns_liveness_not_serving_when_the_engine_dies():
    class Engine:
        why: str | None = None

        def dead(self) -> str | None:
            return self.why

    servicer = health.aio.HealthServicer()
    await servicer.set(liveness.LIVENESS_SERVICE, SERVING)
    await servicer.set("", SERVING)
    engine = Engine()
    watching = asyncio.create_task(liveness.watch(engine, servicer, interval_s=0.01))

    async def status(service: str) -> int:
        return (await servicer.Check(health_pb2.HealthCheckRequest(service=service), None)).status

    await asyncio.sleep(0.05)
    assert await status(liveness.LIVENESS_SERVICE) == SERVING
    engine.why = "CUDA error: an illegal memory access was encountered"
    await asyncio.wait_for(watching, 5)
    assert await status(liveness.LIVENESS_SERVICE) == NOT_SERVING
    assert await status("") == SERVING  # readiness is another question
