"""The scheduler's admission and ordering, on a fake engine (control flow only: no model runs here).

``FakeRecordingEngine`` (tests.support.fake_engine, shared with the server's tests) stands in for the
transformers engine: it records when each request starts (joins the batch, or runs alone) and lets batch rows
finish after a fixed number of decode steps; its ``FakeBatch`` stands in for the decode batch with a fixed
number of rows it admits.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from omnigate.conversation import (
    ContentPart,
    GenerationMode,
    GenerationParams,
    GenerationRequest,
    Message,
    Modality,
)
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.scheduler import Scheduler
from omnigate_worker.settings import WorkerSettings
from tests.support.fake_engine import FakeRecordingEngine
from tests.support.waiting import async_wait_until


def _request(name: str, mode=GenerationMode.TEXT, prompt_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message("user", [ContentPart(Modality.TEXT, text=f"{name}:{prompt_tokens}")])],
        params=GenerationParams(max_new_tokens=4),
        mode=mode,
    )


def _scheduler(engine, **settings) -> Scheduler:
    scheduler = Scheduler(
        engine,
        WorkerSettings(model="fake", max_batch_wait_ms=0, **settings),
        WorkerMetrics(CollectorRegistry()),
    )
    scheduler.start()
    return scheduler


async def _finish(job) -> list:
    return [event async for event in job.events()]


async def test_a_request_that_runs_alone_waits_for_the_batch_and_keeps_arrival_order():
    """Text A decodes; image B (alone) arrives next, then text C: B runs once A has left the batch, and C,
    though it could batch at once, does not jump ahead of B."""
    engine = FakeRecordingEngine(steps=5)
    scheduler = _scheduler(engine)
    try:
        a = scheduler.submit(_request("A"))
        await async_wait_until(lambda: ("join", "A") in engine.log, what="A to join")
        b = scheduler.submit(_request("B", GenerationMode.IMAGE))
        c = scheduler.submit(_request("C"))
        await asyncio.gather(_finish(a), _finish(b), _finish(c))
    finally:
        scheduler.shutdown()
    starts = [entry for entry in engine.log if entry[0] != "end"]
    assert starts == [("join", "A"), ("alone", "B"), ("join", "C")]
    assert engine.log.index(("end", "A")) < engine.log.index(("alone", "B"))


async def test_rows_join_only_while_the_batch_admits_them():
    """A batch that admits two rows: the third request joins when one of the first two has left."""
    engine = FakeRecordingEngine(capacity=2, steps=3)
    scheduler = _scheduler(engine)
    try:
        jobs = [scheduler.submit(_request(name)) for name in "ABC"]
        await asyncio.gather(*(_finish(job) for job in jobs))
    finally:
        scheduler.shutdown()
    assert max(engine.batch.widths) == 2
    assert engine.log.index(("join", "C")) > min(
        engine.log.index(("end", "A")), engine.log.index(("end", "B"))
    )


async def test_joiners_between_two_steps_share_the_prefill_budget():
    """prefill_tokens_per_step=10: two 6-token prompts do not join between the same two steps."""
    engine = FakeRecordingEngine(steps=4)
    engine.hold.clear()
    scheduler = _scheduler(engine, prefill_tokens_per_step=10)
    try:
        blocker = scheduler.submit(_request("X", GenerationMode.IMAGE))  # holds the loop while both queue up
        await async_wait_until(lambda: ("alone", "X") in engine.log, what="X to run")
        jobs = [scheduler.submit(_request(name, prompt_tokens=6)) for name in "AB"]
        await asyncio.sleep(0)
        engine.hold.set()
        await asyncio.gather(_finish(blocker), *(_finish(job) for job in jobs))
    finally:
        scheduler.shutdown()
    assert engine.batch.widths[0] == 1  # A alone in the first step: B's prompt would pass the budget
    assert 2 in engine.batch.widths  # B joined after it


async def test_a_request_cancelled_in_the_queue_never_starts():
    engine = FakeRecordingEngine()
    engine.hold.clear()
    scheduler = _scheduler(engine)
    try:
        blocker = scheduler.submit(_request("X", GenerationMode.IMAGE))
        await async_wait_until(lambda: ("alone", "X") in engine.log, what="X to run")
        queued = scheduler.submit(_request("Q"))
        await async_wait_until(lambda: scheduler.busy(), what="Q to be queued")
        queued.cancel()
        engine.hold.set()
        events = await _finish(queued)
        await _finish(blocker)
    finally:
        scheduler.shutdown()
    assert events == []
    assert ("join", "Q") not in engine.log and ("alone", "Q") not in engine.log
