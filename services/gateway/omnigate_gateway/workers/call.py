"""One request's call to a worker, and **where a retry happens**.

``PoolCall`` is one Generate request across attempts. A call that fails before any output reached the
client is sent again to another worker (``PoolCall._retry``: at most ``worker_max_retries`` times, within
the request's deadline) when the failure is retriable: UNAVAILABLE (unreachable, crashed, draining, still
loading) or RESOURCE_EXHAUSTED carrying a retry delay (a full queue). Once output has started, a failure
ends the stream with its status: nothing is sent twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Protocol, cast

import grpc

from omnigate import status
from omnigate.conversation import GenerationRequest
from omnigate.errors import DeadlineExceeded, Unavailable
from omnigate.worker.v1 import worker_pb2
from omnigate_gateway import convert
from omnigate_gateway.workers.client import WorkerClient, is_worker_fault

if TYPE_CHECKING:
    from omnigate_gateway.metrics import GatewayMetrics
    from omnigate_gateway.settings import GatewaySettings

    # grpc.aio's call classes are generic only in their stubs
    WorkerCall = grpc.aio.StreamStreamCall[worker_pb2.GenerateRequest, worker_pb2.GenerateResponse]

log = logging.getLogger(__name__)


class Workers(Protocol):
    """What a call needs of the workers it may use: ``pool.WorkerPool``."""

    target: str

    def pick(self, exclude: AbstractSet[str] = ...) -> WorkerClient | None: ...

    def attempt_done(self, worker: WorkerClient, code: grpc.StatusCode | None, fault: bool = ...) -> None: ...

    def no_worker_message(self) -> str: ...


class PoolCall:
    """One Generate request across attempts: iterate it for worker events, ``cancel()`` it when done.

    An attempt that fails before its first event is retried on another worker when the failure is
    retriable and the budget and deadline allow; the last failure is raised as the ``grpc.RpcError`` it
    was (``target`` names the worker that produced it).
    """

    def __init__(
        self,
        pool: Workers,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        request: GenerationRequest,
        timeout_s: float | None,
        metadata: list[tuple[str, str]] | None,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._request = request
        self._metadata = metadata
        self._deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self._tried: set[str] = set()
        self._retries = 0
        self._started = False  # an event went to the caller: no retry from now on
        self._worker: WorkerClient | None = None
        self._call: WorkerCall | None = None
        self.target = pool.target

    def __aiter__(self) -> PoolCall:
        return self

    async def __anext__(self) -> worker_pb2.GenerateResponse:
        while True:
            call = self._call if self._call is not None else self._attempt()
            try:
                event = await call.read()
            except grpc.RpcError as exc:
                # A connection lost under the call is the worker going away: book it as UNAVAILABLE.
                code = grpc.StatusCode.UNAVAILABLE if status.is_connection_lost(exc) else exc.code()
                self._end(code, is_worker_fault(code, status.retry_after_s(exc)))
                if not self._retry(exc):
                    raise
                continue
            if event is grpc.aio.EOF:
                self._end(grpc.StatusCode.OK)
                raise StopAsyncIteration
            self._started = True
            return cast(worker_pb2.GenerateResponse, event)  # read() gives a message or EOF, ruled out above

    def cancel(self) -> None:
        """Stops the current attempt (no-op when it has ended)."""
        if self._call is not None:
            self._call.cancel()
            self._end(None)

    def _attempt(self) -> WorkerCall:
        """Starts the call on the least busy worker not tried yet; returns it (it is also ``self._call``)."""
        worker = self._pool.pick(self._tried)
        if worker is None:
            raise Unavailable(self._pool.no_worker_message())
        timeout = None
        if self._deadline is not None:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                raise DeadlineExceeded("the request's deadline passed before a worker could take it")
        self._tried.add(worker.target)
        self.target = worker.target
        worker.outstanding += 1
        self._worker = worker
        stream = convert.worker_stream(self._request, self._settings.worker_chunk_bytes)
        self._call = worker.stub.Generate(stream, timeout=timeout, metadata=self._metadata)
        return self._call

    def _end(self, code: grpc.StatusCode | None, fault: bool = False) -> None:
        if self._worker is not None:
            self._pool.attempt_done(self._worker, code, fault)
        self._worker = None
        self._call = None

    def _retry(self, exc: grpc.RpcError) -> bool:
        """Whether to try another worker after ``exc`` (counts the failed attempt when so)."""
        code = exc.code()
        retriable = (
            code is grpc.StatusCode.UNAVAILABLE
            or status.is_connection_lost(exc)  # the worker died while we were sending it the request
            or (code is grpc.StatusCode.RESOURCE_EXHAUSTED and status.retry_after_s(exc) is not None)
        )
        s = self._settings
        if self._started or not retriable or self._retries >= s.worker_max_retries:
            return False
        if self._deadline is not None and self._deadline <= time.monotonic():
            return False
        if self._pool.pick(self._tried) is None:
            return False
        self._retries += 1
        log.info(
            "worker %s failed before any output (%s: %s); trying another worker",
            self.target,
            code.name,
            exc.details(),
        )
        self._metrics.upstream_errors.labels(code.name).inc()
        self._metrics.upstream_retries.inc()
        return True
