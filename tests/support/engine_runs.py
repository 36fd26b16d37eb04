"""Requests through a real engine in-process, as the worker's server runs them: one alone through the
engine's ``generate`` (``alone``), or several at once through the scheduler's batch (``batched``). Each
gives the request's text (its deltas joined) and every event it emitted, the summary last."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from prometheus_client import CollectorRegistry

from omnigate.conversation import GenerationRequest, TextDelta
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.scheduler import Scheduler


def alone(engine: Any, request: GenerationRequest) -> tuple[str, list]:
    events: list = []
    engine.generate(request, events.append, threading.Event())
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events


async def batched(engine: Any, requests: list[GenerationRequest]) -> list[tuple[str, list]]:
    """All of ``requests`` submitted together to a scheduler over ``engine`` (with its own settings)."""
    scheduler = Scheduler(engine, engine._settings, WorkerMetrics(CollectorRegistry()))
    scheduler.start()

    async def collect(job):
        events = [event async for event in job.events()]
        return "".join(e.text for e in events if isinstance(e, TextDelta)), events

    try:
        return await asyncio.gather(*(collect(scheduler.submit(r)) for r in requests))
    finally:
        scheduler.shutdown()
