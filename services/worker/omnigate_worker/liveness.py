"""Liveness: whether this worker process can still serve at all, apart from whether it is ready now.

Readiness (the grpc.health.v1 services ``""`` and ``omnigate.worker.v1.WorkerService``) says SERVING once the
model is loaded and NOT_SERVING while loading or draining: a worker not ready yet should get no requests,
not be restarted. Liveness (the health service ``liveness``) says SERVING from the start and turns
NOT_SERVING for good when the engine is dead: its thread ended, or a device error (a CUDA fault: illegal
memory access, device-side assert) poisoned the CUDA context so that every later step would fail too. Only a
restart cures that, and the chart's livenessProbe asks for this service.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

LIVENESS_SERVICE = "liveness"  # the grpc.health.v1 service name the livenessProbe checks
CHECK_INTERVAL_S = 1.0

# Messages of errors after which a CUDA context (and so the engine) is unusable until the process restarts.
FATAL_DEVICE_ERRORS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
)


def is_fatal_device_error(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the device unusable (an out-of-memory error does not: the next step may fit)."""
    text = str(exc)
    return "out of memory" not in text and any(marker in text for marker in FATAL_DEVICE_ERRORS)


class Engine(Protocol):
    """What liveness needs of the scheduler: ``scheduler.Scheduler``."""

    def dead(self) -> str | None: ...


async def watch(
    engine: Engine, servicer: health.aio.HealthServicer, interval_s: float = CHECK_INTERVAL_S
) -> None:
    """Sets the liveness service NOT_SERVING (once, logged) when the engine dies; runs until cancelled."""
    while True:
        why = engine.dead()
        if why is not None:
            log.error("the engine is dead (%s): liveness NOT_SERVING, waiting for a restart", why)
            await servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
            return
        await asyncio.sleep(interval_s)
