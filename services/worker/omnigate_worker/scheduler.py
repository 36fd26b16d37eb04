"""A bounded queue in front of the engine, and a thread that runs queued requests.

The gRPC server is asyncio; ``Engine.generate`` is blocking (torch). Each accepted request becomes a
``Job``: the engine thread runs it and hands events back to the event loop through an asyncio queue.
One request runs at a time (dynamic batching replaces this loop in a later step behind the same
``submit`` / ``Job.events`` interface).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator

from omnigate.conversation import Event, GenerationRequest
from omnigate.errors import LimitExceeded, Unavailable
from omnigate_worker.engine import Engine
from omnigate_worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

_DONE = object()


class Job:
    """One accepted request: its events arrive on the event loop that submitted it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.cancelled = threading.Event()
        self.enqueued_at = time.monotonic()
        self.started_at: float | None = None
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    # -- engine thread side --
    def emit(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def finish(self, error: BaseException | None = None) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, error if error is not None else _DONE)

    # -- event loop side --
    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        """Yields the job's events; raises the engine's exception if it failed."""
        while True:
            item = await self._events.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    """Admits requests into a bounded queue and runs them on one engine thread."""

    def __init__(self, engine: Engine, max_queue: int, metrics: WorkerMetrics) -> None:
        self._engine = engine
        self._max_queue = max_queue
        self._metrics = metrics
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._running: Job | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Job:
        """Queues a request. Raises LimitExceeded when the queue is full, Unavailable when draining."""
        job = Job(request, asyncio.get_running_loop())
        with self._cond:
            if not self._accepting:
                raise Unavailable(
                    "the worker is shutting down and takes no new requests; retry on another worker"
                )
            if len(self._pending) >= self._max_queue:
                raise LimitExceeded(
                    f"the worker's queue is full ({self._max_queue} requests waiting); retry later",
                    retry_after_s=1.0,
                )
            self._pending.append(job)
            self._metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        return job

    def busy(self) -> bool:
        with self._cond:
            return bool(self._pending) or self._running is not None

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def shutdown(self) -> None:
        """Stops the engine thread after the current job; cancels jobs still queued."""
        with self._cond:
            self._stopped = True
            self._accepting = False
            for job in self._pending:
                job.finish(Unavailable("the worker shut down before this request ran"))
            self._pending.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                job = self._pending.popleft()
                self._metrics.queue_depth.set(len(self._pending))
                self._running = job
            try:
                if job.cancelled.is_set():
                    job.finish()
                    continue
                job.started_at = time.monotonic()
                self._engine.generate(job.request, job.emit, job.cancelled)
                job.finish()
            except BaseException as exc:  # noqa: BLE001 - handed to the request's stream, which maps it
                log.debug("request %s failed", job.request.request_id, exc_info=True)
                job.finish(exc)
            finally:
                with self._cond:
                    self._running = None
