"""Fixtures for the gateway's tests: misbehaving HTTP servers, a fake worker, real gateway processes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from omnigate.worker.v1 import worker_pb2 as wk
from omnigate.worker.v1 import worker_pb2_grpc
from tests.integration.conftest import MODELS_DIR, Service, start_service, wait_serving
from tests.support.hostile_server import HostileServer

WORKER_SERVICE = wk.DESCRIPTOR.services_by_name["WorkerService"].full_name
# What the fake worker reports: the tiny Qwen2.5-Omni's processor bounds.
FAKE_MAX_IMAGE_PIXELS = 50176
FAKE_MAX_VIDEO_FRAME_PIXELS = 12544


class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    """A FAKE worker (test double, no model): reports fixed model info, records what the gateway sends
    and answers every Generate with one text delta and a summary. For tests of the gateway's media
    handling, where the model's answer does not matter."""

    def __init__(self) -> None:
        self.specs: list[wk.GenerateSpec] = []
        self.media: list[dict[int, bytes]] = []

    def GetModelInfo(self, request, context):  # noqa: N802 - gRPC method name
        return wk.GetModelInfoResponse(
            model_id="fake-worker",
            architecture="FakeForTests",
            input_modalities=[wk.MODALITY_TEXT, wk.MODALITY_IMAGE, wk.MODALITY_AUDIO, wk.MODALITY_VIDEO],
            output_modalities=[wk.MODALITY_TEXT],
            input_audio_sample_rate=16000,
            max_new_tokens=4096,
            max_request_media_bytes=1 << 30,
            device="cpu",
            max_image_pixels=FAKE_MAX_IMAGE_PIXELS,
            max_video_frame_pixels=FAKE_MAX_VIDEO_FRAME_PIXELS,
        )

    def Generate(self, request_iterator, context):  # noqa: N802 - gRPC method name
        spec = None
        blobs: dict[int, bytearray] = {}
        for message in request_iterator:
            if message.HasField("spec"):
                spec = message.spec
            else:
                blobs.setdefault(message.media_chunk.media_id, bytearray()).extend(message.media_chunk.data)
        self.specs.append(spec)
        self.media.append({k: bytes(v) for k, v in blobs.items()})
        yield wk.GenerateResponse(text=wk.TextDelta(text="ok"))
        yield wk.GenerateResponse(
            summary=wk.Summary(finish_reason=wk.FINISH_REASON_STOP, prompt_tokens=len(blobs), output_tokens=1)
        )

    def last_parts(self) -> list:
        return [part for message in self.specs[-1].messages for part in message.content]

    def last_image(self) -> np.ndarray:
        """The pixels of the first image of the last request, as the worker received them."""
        ref = next(p.image for p in self.last_parts() if p.WhichOneof("part") == "image")
        return np.frombuffer(self.media[-1][ref.media_id], np.uint8).reshape(ref.height, ref.width, 3)


@pytest.fixture(scope="session")
def fake_worker() -> Iterator[tuple[FakeWorker, str]]:
    """A fake worker serving on a loopback port; yields (servicer, target)."""
    servicer = FakeWorker()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    for name in ("", WORKER_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def _server(host: str) -> Iterator[HostileServer]:
    server = HostileServer(host)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def hostile_server() -> Iterator[HostileServer]:
    """A misbehaving HTTP server on 127.0.0.1."""
    yield from _server("127.0.0.1")


@pytest.fixture(scope="session")
def second_loopback_server() -> Iterator[HostileServer]:
    """The same server on 127.0.0.2: tests that refuse loopback allow this one address as an exception
    (``allowed_networks``), to stand in for a public host."""
    yield from _server("127.0.0.2")


GatewayFactory = Callable[..., Service]


@pytest.fixture(scope="session")
def gateway_factory(tmp_path_factory) -> Iterator[GatewayFactory]:
    """Starts real gateway processes: ``factory(worker_target, env={...}, hosts={name: address})``.

    With ``hosts``, the gateway resolves names from that table instead of DNS (``resolver_gateway``).
    Waits until the gateway is SERVING; stops them all at the end of the session.
    """
    started: list[Service] = []

    def factory(worker_target: str, env: dict[str, str] | None = None, hosts: dict | None = None) -> Service:
        workdir = Path(tmp_path_factory.mktemp("gateway"))
        full_env = {
            "OMNIGATE_GATEWAY_WORKER_TARGET": worker_target,
            "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.5",
            **(env or {}),
        }
        module = "omnigate_gateway.main"
        if hosts is not None:
            module = "tests.gateway.resolver_gateway"
            full_env["OMNIGATE_TEST_HOSTS"] = json.dumps(hosts)
        service = start_service(f"gateway{len(started)}", module, full_env, workdir)
        started.append(service)
        wait_serving(service, timeout_s=60)
        return service

    try:
        yield factory
    finally:
        for service in started:
            service.stop()


@pytest.fixture(scope="session")
def omni_worker(tmp_path_factory) -> Iterator[Service]:
    """A real worker serving the tiny Qwen2.5-Omni (for tests where the model's answer matters)."""
    model = MODELS_DIR / "tiny-qwen2.5-omni"
    if not (model / "config.json").exists():
        pytest.fail(f"{model} is missing: run `make models` (make test does it first)")
    worker = start_service(
        "worker", "omnigate_worker.main", {"OMNIGATE_WORKER_MODEL": str(model)}, tmp_path_factory.mktemp("w")
    )
    try:
        wait_serving(worker)
        yield worker
    finally:
        worker.stop()
