"""The gateway's connection to its worker: model info, health, and the Generate stream."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate.conversation import GenerationRequest, ModelInfo
from omnigate.errors import Unavailable
from omnigate.worker.v1 import worker_pb2, worker_pb2_grpc
from omnigate_gateway import convert
from omnigate_gateway.channels import worker_channel
from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


class WorkerClient:
    def __init__(self, target: str, settings: GatewaySettings) -> None:
        self.target = target
        self._chunk_bytes = settings.worker_chunk_bytes
        self._channel = worker_channel(target, settings)
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.info: ModelInfo | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def refresh(self, timeout_s: float = 2.0) -> bool:
        """Checks the worker's health and (re)reads its model info; True when it is SERVING."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=timeout_s
            )
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
            if self.info is None:
                info = await self._stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=timeout_s)
                self.info = convert.model_info_from_worker(info)
                log.info("worker %s serves %s", self.target, self.info.model_id)
            return True
        except grpc.RpcError as exc:
            log.debug("worker %s not ready: %s", self.target, exc)
            return False

    def require_info(self) -> ModelInfo:
        if self.info is None:
            raise Unavailable("no worker is ready yet (the model may still be loading); retry shortly")
        return self.info

    def generate(self, request: GenerationRequest, timeout_s: float | None):
        """Starts the worker's Generate stream; iterate the returned call for worker events."""
        return self._stub.Generate(convert.worker_stream(request, self._chunk_bytes), timeout=timeout_s)
