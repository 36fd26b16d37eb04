"""One worker, as the gateway sees it: its channel and stubs, its health, its model, and its ejection state.

- **Health.** ``WorkerClient.watch`` asks the worker's ``grpc.health.v1`` status every
  ``worker_check_interval_s`` (at once after a failed call). A worker is *ready* when it answers SERVING and
  serves the pool's model, *draining* when it answered NOT_SERVING after having served (SIGTERM),
  *not_ready* when it cannot be reached, is still loading or serves another model, *ejected* for
  ``worker_ejection_s`` after ``worker_eject_after_failures`` failed calls in a row (the pool decides an
  ejection, ``pool.py``; the worker keeps the count and the time).
- **Faults.** ``is_worker_fault`` says which failed calls count against a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate.conversation import ModelInfo
from omnigate.worker.v1 import worker_pb2, worker_pb2_grpc
from omnigate_gateway import convert
from omnigate_gateway.workers.channels import worker_channel

if TYPE_CHECKING:
    from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
STATES = ("ready", "not_ready", "ejected", "draining")
STATE_WORDS = {
    "ready": "ready",
    "not_ready": "not ready (unreachable, loading its model, or serving another model)",
    "ejected": "ejected after failed calls",
    "draining": "draining",
}

# Failures that count against a worker (toward ejection): the worker is gone, refuses work (draining, not
# ready), or reports it is out of a resource (a full queue, out of memory: RESOURCE_EXHAUSTED with a retry
# delay). Everything else is the worker's answer to one request (its input was bad, too long, or hit a bug),
# which says nothing about the next request: counting INTERNAL let a handful of bad requests eject the only
# worker and turn the gateway NOT_SERVING. A worker that is broken for every request says so through its
# health (the watch marks it not ready).
_WORKER_FAULTS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}


def is_worker_fault(code: grpc.StatusCode | None, retry_after_s: float | None = None) -> bool:
    """Whether a call ending with ``code`` counts against the worker (see ``_WORKER_FAULTS``)."""
    return code in _WORKER_FAULTS or (
        code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_s is not None
    )


class WorkerClient:
    """One worker: its channel, health and model info, and what this gateway has outstanding on it."""

    def __init__(self, target: str, settings: GatewaySettings) -> None:
        self.target = target
        self._settings = settings
        self._open()
        self.info: ModelInfo | None = None
        self.serving = False  # the last health check answered SERVING
        self.draining = False  # it answered NOT_SERVING after having served
        self.suspect = False  # a call failed as unavailable: no new requests until the next health check
        self.outstanding = 0  # calls this gateway has on it now
        self.failures = 0  # worker faults in a row
        self.ejected_until = 0.0
        self.removed = False  # no longer discovered: closes once its calls are done
        self.recheck = asyncio.Event()
        self.watcher: asyncio.Task | None = None

    def _open(self) -> None:
        self.channel = worker_channel(self.target, self._settings)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def reopen(self) -> grpc.aio.Channel:
        """Opens a new channel (new TLS files); returns the old one, for the caller to close when done."""
        old = self.channel
        self._open()
        return old

    def state(self, model_id: str | None, now: float) -> str:
        if self.draining:
            return "draining"
        if not self.serving or self.suspect or self.info is None or self.info.model_id != model_id:
            return "not_ready"
        if self.ejected_until > now:
            return "ejected"
        return "ready"

    async def check(self, timeout_s: float) -> bool:
        """Asks the worker's health (and, when it starts serving, its model info); updates the state.

        Returns True when the model info was (re)read.
        """
        read_info = False
        try:
            # types-grpcio-health-checking declares HealthStub without its methods
            reply = await self.health.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=timeout_s
            )
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                if self.info is None or not self.serving:
                    info = await self.stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=timeout_s)
                    self.info = convert.model_info_from_worker(info)
                    read_info = True
                    log.info("worker %s serves %s", self.target, self.info.model_id)
                self.serving, self.draining = True, False
            else:
                if self.serving and not self.draining:
                    log.info("worker %s is draining (NOT_SERVING): no new requests go to it", self.target)
                self.draining = self.draining or self.serving
                self.serving = False
        except grpc.RpcError as exc:
            if self.serving or self.draining:
                log.warning("worker %s is unreachable: %s", self.target, exc.details() or exc.code().name)
            self.serving = self.draining = False
            self.info = None  # a worker that comes back may be a new process (reread its model)
        self.suspect = False
        return read_info

    async def watch(self, interval_s: float, timeout_s: float, checked: Callable[[bool], None]) -> None:
        """Checks the worker's health every ``interval_s``, and at once when ``recheck`` is set, until
        cancelled; ``checked(fresh)`` runs after each check (``fresh``: the model info was reread)."""
        while True:
            self.recheck.clear()
            checked(await self.check(timeout_s))
            with contextlib.suppress(TimeoutError):  # (asyncio.wait_for could swallow a cancellation)
                async with asyncio.timeout(interval_s):
                    await self.recheck.wait()
