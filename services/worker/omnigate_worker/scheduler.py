"""Admission, preprocessing and the engine loop.

The gRPC server is asyncio; the model is blocking torch code. Each accepted request becomes a ``Job``:

1. ``submit`` admits it into a bounded queue (RESOURCE_EXHAUSTED with a retry delay when full);
2. small thread pools run the chat template and processor (CPU work that overlaps with decoding), one
   for requests with media and one for text-only requests, which so never wait behind media;
3. the engine thread runs the loop: between decode steps it admits prepared text requests into the
   running batch (each is prefilled and joins; see batching.py), runs one decode step for all rows, and
   lets finished, cancelled or expired rows leave. Requests that cannot batch (speech, image output, or
   a model whose cache cannot be merged) run on their own when they reach the head of the queue and the
   batch has drained, so arrival order is kept.

Events go back to the request's event loop through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from omnigate import tracing
from omnigate.conversation import Event, GenerationRequest, Modality, Summary, TextDelta
from omnigate.errors import DeadlineExceeded, InvalidInput, LimitExceeded, Unavailable
from omnigate_worker.engine.base import Batch, Engine, Prepared
from omnigate_worker.liveness import is_fatal_device_error
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.settings import WorkerSettings

log = logging.getLogger(__name__)

_DONE = object()


class Job:
    """One accepted request: its events arrive on the event loop that submitted it."""

    def __init__(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, deadline: float | None
    ) -> None:
        self.request = request
        self.deadline = deadline  # time.monotonic() value, or None
        self.cancelled = threading.Event()
        self.enqueued_at = time.monotonic()
        self.started_at: float | None = None
        self.prepared: Prepared | None = None
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._finished = False
        # Tracing: the request's context (its worker.generate span, its request id), taken on the event
        # loop, is made current on the threads working for it (``activated``). What is not one block of
        # code on one thread (time in the queue, a row's share of the shared decode loop) is recorded
        # with explicit times.
        self.trace_context = tracing.current_context()
        self.request_id = tracing.current_request_id() or tracing.sane_request_id(request.request_id)
        self.prefilled_at: float | None = None  # set when a row joined the batch
        self.summary: Summary | None = None

    # -- engine side (any thread) --
    def emit(self, event: Event) -> None:
        if isinstance(event, Summary):
            self.summary = event
        self._deliver(event)

    def _deliver(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the request's event loop is closed: no one is listening any more
            log.debug("request %s: its event loop is closed; an event is dropped", self.request_id)

    def finish(self, error: BaseException | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        self._trace_finished(error)
        self._deliver(error if error is not None else _DONE)

    def activated(self) -> contextlib.AbstractContextManager[None]:
        """Makes the request's trace context and request id current on this thread (logs, child spans)."""
        return tracing.activate(context=self.trace_context, request_id=self.request_id)

    def trace_started(self) -> None:
        assert self.started_at is not None  # called once the job has started
        tracing.record_span(
            tracing.WORKER, "worker.queue", self.trace_context, self.enqueued_at, self.started_at
        )

    def outcome(self) -> dict[str, int | str | bool]:
        """Span attributes for how the request ended (tokens, finish reason)."""
        attributes: dict[str, int | str | bool] = {"omnigate.cancelled": self.cancelled.is_set()}
        if self.summary is not None:
            attributes["omnigate.prompt_tokens"] = self.summary.prompt_tokens
            attributes["omnigate.output_tokens"] = self.summary.output_tokens
            attributes["omnigate.finish_reason"] = self.summary.finish_reason or ""
        return attributes

    def _trace_finished(self, error: BaseException | None) -> None:
        now = time.monotonic()
        if self.started_at is None:  # never ran (cancelled, expired or refused): all of it was queueing
            tracing.record_span(
                tracing.WORKER, "worker.queue", self.trace_context, self.enqueued_at, now, error=error
            )
        elif self.prefilled_at is not None:  # a batch row: its time in the decode loop, shared with others
            tracing.record_span(
                tracing.WORKER,
                "worker.decode",
                self.trace_context,
                self.prefilled_at,
                now,
                self.outcome(),
                error,
            )

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    # -- event loop side --
    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        """Yields the job's events; raises the engine's exception if it failed.

        Text deltas already waiting are merged into one, so a busy worker sends fewer, larger messages
        while an idle one still sends each delta as soon as it exists.
        """
        pending = None
        while True:
            item = pending if pending is not None else await self._events.get()
            pending = None
            if isinstance(item, TextDelta):
                text = item.text
                while not self._events.empty():
                    following = self._events.get_nowait()
                    if not isinstance(following, TextDelta):
                        pending = following
                        break
                    text += following.text
                item = TextDelta(text)
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    """Admits requests, prepares them on a thread pool, and runs the engine loop on its own thread."""

    def __init__(self, engine: Engine, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        # Two lanes, so that one request's preprocessing cannot stall others': requests with media (image
        # and video processors, audio features: up to max_preprocess_s each) take ``preprocess_threads``
        # threads; text-only requests, whose chat template and tokenizer are bounded by the request limits
        # (messages, parts, prompt text), have a thread of their own and never wait behind media.
        self._preprocess = ThreadPoolExecutor(
            max_workers=settings.preprocess_threads, thread_name_prefix="prepare"
        )
        self._preprocess_text = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-text")
        self._ready: collections.deque[Job] = collections.deque()
        self._waiting = 0  # admitted and not yet running (preparing or ready)
        self._running = 0  # in the batch or running alone
        self._cond = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._fatal: BaseException | None = None  # a device error that poisoned the engine (liveness.py)

    def start(self) -> None:
        self._thread.start()

    # -- admission (event loop) ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest, timeout_s: float | None = None) -> Job:
        """Queues a request. Raises LimitExceeded when the queue is full, Unavailable when draining."""
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        job = Job(request, asyncio.get_running_loop(), deadline)
        with self._cond:
            self._check_accepting()
            if self._waiting >= self._settings.max_queue:
                raise LimitExceeded(
                    f"the worker's queue is full ({self._settings.max_queue} requests waiting); retry later",
                    retry_after_s=self._settings.queue_retry_after_s,
                )
            self._waiting += 1
            self._metrics.queue_depth.set(self._waiting)
        media = any(part.type is not Modality.TEXT for m in request.messages for part in m.content)
        (self._preprocess if media else self._preprocess_text).submit(self._prepare, job)
        return job

    def check_accepting(self) -> None:
        """Raises Unavailable when draining: lets a call be refused before its media is read."""
        with self._cond:
            self._check_accepting()

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise Unavailable(
                "the worker is shutting down and takes no new requests; retry on another worker"
            )

    def dead(self) -> str | None:
        """Why the engine can serve no more (liveness.py), or None: its thread ended without being stopped,
        or a device error poisoned it."""
        if self._fatal is not None:
            return f"{type(self._fatal).__name__}: {self._fatal}"
        if not self._thread.is_alive() and self._thread.ident is not None and not self._stopped:
            return "the engine thread ended"
        return None

    def _check_fatal(self, exc: BaseException) -> None:
        if self._fatal is None and is_fatal_device_error(exc):
            self._fatal = exc

    def busy(self) -> bool:
        with self._cond:
            return self._waiting > 0 or self._running > 0

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def shutdown(self) -> None:
        """Stops the engine loop; requests still queued or running get UNAVAILABLE."""
        with self._cond:
            self._stopped = True
            self._accepting = False
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._preprocess.shutdown(wait=False, cancel_futures=True)
        self._preprocess_text.shutdown(wait=False, cancel_futures=True)

    # -- preprocessing (thread pool) ----------------------------------------------------------------

    def _prepare(self, job: Job) -> None:
        try:
            if job.cancelled.is_set() or job.expired():
                raise (
                    DeadlineExceeded("the request's deadline passed before it ran")
                    if job.expired()
                    else _Cancelled()
                )
            started = time.monotonic()
            with job.activated(), tracing.tracer(tracing.WORKER).start_as_current_span("worker.preprocess"):
                job.prepared = self._engine.prepare(job.request)
                job.prepared.trace_context = job.trace_context
            # Preprocessing is bounded by the request limits (messages, parts, media, prompt text); this
            # catches whatever still took too long, so such a request never also takes the engine's time.
            took = time.monotonic() - started
            if took > self._settings.max_preprocess_s:
                log.warning("preprocessing a request took %.1f s; refused", took)
                raise LimitExceeded(
                    f"preparing the request's inputs took {took:.1f} s; the limit is "
                    f"{self._settings.max_preprocess_s:g} s (send fewer or smaller media)"
                )
            budget = self._settings.max_prompt_tokens
            if job.prepared.prompt_len > budget:
                self._metrics.rejected.labels("too_long").inc()
                raise LimitExceeded(
                    f"the prompt is {job.prepared.prompt_len} tokens after media expansion; the limit is {budget} "
                    "(send shorter or fewer media, or a lower video fps)"
                )
        except BaseException as exc:  # noqa: BLE001 - handed to the request's stream, which maps it
            with self._cond:
                self._waiting -= 1
                self._metrics.queue_depth.set(self._waiting)
            job.finish(None if isinstance(exc, _Cancelled) else exc)
            return
        with self._cond:
            self._ready.append(job)
            self._cond.notify()

    # -- the engine loop (engine thread) ------------------------------------------------------------

    def _loop(self) -> None:
        batch = self._engine.open_batch()
        while True:
            admitted, alone = self._next_work(batch)
            if admitted is None:
                batch.fail_all(Unavailable("the worker shut down before this request finished"))
                self._fail_ready(Unavailable("the worker shut down before this request ran"))
                return
            for job in admitted:
                self._start_row(batch, job)
            if alone is not None:
                self._run_alone(alone)
            if len(batch):
                size = len(batch)
                self._metrics.batch_size.observe(size)
                step_started = time.perf_counter()
                try:
                    batch.step()
                    self._metrics.decode_step.labels(str(_bucket(size))).observe(
                        time.perf_counter() - step_started
                    )
                except Exception as exc:  # noqa: BLE001 - every row of a failed step gets the error
                    log.exception("decode step failed")
                    self._check_fatal(exc)
                    batch.fail_all(self._resource_error(exc, len(batch), shared=True))

    def _next_work(self, batch: Batch) -> tuple[list[Job] | None, Job | None]:
        """Waits for work; returns (jobs to add to the batch, a job to run alone); (None, None) when stopped."""
        s = self._settings
        with self._cond:
            while not self._stopped and not self._ready and not len(batch):
                self._cond.wait()
            if self._stopped:
                return None, None
            if not len(batch) and s.max_batch_wait_ms > 0 and self._waiting > len(self._ready):
                # Idle and more requests are being prepared: give them a moment to start together.
                self._cond.wait(timeout=s.max_batch_wait_ms / 1000)
            admitted: list[Job] = []
            prompts: list[int] = []
            alone = None
            while self._ready:
                job = self._ready[0]
                assert job.prepared is not None  # only prepared jobs are ready
                if job.cancelled.is_set() or job.expired():
                    self._ready.popleft()
                    self._dequeued(job)
                    job.finish(
                        DeadlineExceeded("the request's deadline passed before it ran")
                        if job.expired()
                        else None
                    )
                    continue
                if self._engine.can_batch(job.prepared):
                    prompt = job.prepared.prompt_len
                    if not batch.admits(prompt, prompts):
                        break  # waits for a row to leave (slots, batch size, batch tokens)
                    if prompts and sum(prompts) + prompt > s.prefill_tokens_per_step:
                        break  # the rest joins after the next decode step
                    prompts.append(prompt)
                    admitted.append(self._ready.popleft())
                else:
                    if not len(batch) and not admitted:
                        alone = self._ready.popleft()
                    break  # keeps arrival order: it runs once the batch has drained
            for job in admitted + ([alone] if alone else []):
                self._dequeued(job)
                self._running += 1
            return admitted, alone

    def _dequeued(self, job: Job) -> None:
        self._waiting -= 1
        self._metrics.queue_depth.set(self._waiting)

    def _done(self, job: Job, error: BaseException | None) -> None:
        with self._cond:
            self._running -= 1
        if error is None and job.started_at is not None and not job.cancelled.is_set():
            self._metrics.generation_latency.labels(job.request.mode.value).observe(
                time.monotonic() - job.started_at
            )
        job.finish(error)

    def _started(self, job: Job) -> None:
        job.started_at = time.monotonic()
        self._metrics.queue_wait.observe(job.started_at - job.enqueued_at)
        job.trace_started()

    def _resource_error(self, exc: BaseException, rows: int = 1, *, shared: bool = False) -> BaseException:
        """``exc`` as the request(s) see it; ``shared``: a failure of a step shared by several requests,
        which no one request's content is to blame for."""
        error = _resource_error(exc, shared)
        if error is not exc and isinstance(error, LimitExceeded):  # content refusals: counted by the server
            self._metrics.rejected.labels("out_of_memory").inc(rows)
        return error

    def _start_row(self, batch: Batch, job: Job) -> None:
        assert job.prepared is not None  # only prepared jobs are ready
        self._started(job)
        try:
            with job.activated(), tracing.tracer(tracing.WORKER).start_as_current_span("worker.prefill"):
                self._engine.start_row(
                    batch,
                    job.prepared,
                    job.emit,
                    lambda error, job=job: self._done(job, error),
                    job.cancelled,
                    job.deadline,
                )
            job.prefilled_at = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - only this request fails
            log.debug("request %s failed to start", job.request.request_id, exc_info=True)
            self._check_fatal(exc)
            self._done(job, self._resource_error(exc))

    def _run_alone(self, job: Job) -> None:
        assert job.prepared is not None  # only prepared jobs are ready
        self._started(job)
        started_at = job.started_at
        assert started_at is not None  # set by _started
        try:
            # generate() in one call: worker.decode covers it (speech vocoding nests inside), and its
            # worker.prefill child marks the part up to the first output.
            with (
                job.activated(),
                tracing.tracer(tracing.WORKER).start_as_current_span("worker.decode") as span,
            ):
                self._engine.run(job.prepared, job.emit, job.cancelled)
                span.set_attributes(job.outcome())
                if job.summary is not None and job.summary.timings.prefill_s:
                    tracing.record_span(
                        tracing.WORKER,
                        "worker.prefill",
                        None,
                        started_at,
                        started_at + job.summary.timings.prefill_s,
                    )
            self._done(job, None)
        except Exception as exc:  # noqa: BLE001 - only this request fails
            log.debug("request %s failed", job.request.request_id, exc_info=True)
            self._check_fatal(exc)
            self._done(job, self._resource_error(exc))

    def _fail_ready(self, error: BaseException) -> None:
        with self._cond:
            jobs = list(self._ready)
            self._ready.clear()
        for job in jobs:
            job.finish(error)


def _bucket(size: int) -> int:
    """The power of two at or above ``size`` (the decode-step metric's label)."""
    return 1 << max(0, size - 1).bit_length()


class _Cancelled(Exception):
    """The client went away before the request was prepared."""


def _resource_error(exc: BaseException, shared: bool = False) -> BaseException:
    """Out-of-memory fails only the request(s) it hit, as RESOURCE_EXHAUSTED; the model refusing a request's
    content fails it as INVALID_ARGUMENT; other errors pass through (INTERNAL)."""
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return LimitExceeded(
            "the worker ran out of memory for this request; retry later or send less input", retry_after_s=5.0
        )
    if not shared and isinstance(exc, ValueError | IndexError | TypeError):
        # What transformers' model code raises for inputs it cannot take (e.g. audio too short to give one
        # feature frame: IndexError in the audio tower). Device failures (CUDA errors) are RuntimeErrors and
        # stay internal.
        log.info("the model refused a request's content: %r", exc)
        return InvalidInput(
            f"the model cannot process this request's content ({type(exc).__name__}: {str(exc)[:200]})"
        )
    return exc
