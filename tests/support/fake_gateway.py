"""A FAKE GatewayService for the SDK's control-flow tests (retries, deadlines, metadata, TLS).

It is a real gRPC server on a loopback port chosen by the OS, answering from a script: each call takes the
next ``Step`` (fail with a status, possibly after some events and with a RetryInfo; or stream events;
or stall), so a test can say "UNAVAILABLE twice, then succeed" and check what the client did. It records
every call (arrival time, metadata). Nothing here generates anything: tests of real generation use the
real stack.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc


@dataclass
class Step:
    """What the fake does for one call."""

    code: grpc.StatusCode | None = None  # None = succeed
    message: str = ""
    retry_after_s: float | None = None  # attach a RetryInfo with this delay
    texts: tuple[str, ...] = ("Hello", " world")  # text deltas sent first (also before a failure)
    delay_before_s: float = 0.0  # sleep before answering (to test deadlines)
    delay_between_s: float = 0.0  # sleep between text deltas
    reason: str = "FAKE_REASON"


@dataclass
class Recorded:
    at: float
    metadata: dict[str, str]
    deadline_s: float | None


@dataclass
class FakeGateway:
    steps: list[Step] = field(default_factory=list)
    request_id: str | None = "fake-request-1"
    calls: list[Recorded] = field(default_factory=list)
    cancelled_calls: int = 0  # Generate calls that ended before their summary (client gone, or aborted)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_step(self, context) -> Step:
        with self.lock:
            self.calls.append(
                Recorded(
                    at=time.monotonic(),
                    metadata={k: v for k, v in context.invocation_metadata() if isinstance(v, str)},
                    deadline_s=context.time_remaining(),
                )
            )
            return self.steps.pop(0) if self.steps else Step()


class _FakeServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, fake: FakeGateway) -> None:
        self.fake = fake

    def Generate(self, request, context):  # noqa: N802 - gRPC method name
        step = self.fake.next_step(context)
        if self.fake.request_id:
            context.send_initial_metadata((("x-request-id", self.fake.request_id),))
        if step.delay_before_s:
            end = time.monotonic() + step.delay_before_s
            while time.monotonic() < end and context.is_active():
                time.sleep(0.01)
        completed = []

        def on_end() -> None:
            if not completed:
                with self.fake.lock:
                    self.fake.cancelled_calls += 1

        context.add_callback(on_end)
        for text in step.texts:
            yield pb.GenerateResponse(text=pb.TextDelta(text=text))
            time.sleep(step.delay_between_s)
        if step.code is not None:
            context.abort_with_status(_status(step))
        completed.append(True)
        yield pb.GenerateResponse(
            summary=pb.Summary(
                finish_reason=pb.FINISH_REASON_STOP,
                prompt_tokens=3,
                output_tokens=len(step.texts),
                model_id="fake",
                timings=pb.Timings(total_s=0.01),
            )
        )

    def GetModelInfo(self, request, context):  # noqa: N802 - gRPC method name
        step = self.fake.next_step(context)
        if step.code is not None:
            context.abort_with_status(_status(step))
        return pb.GetModelInfoResponse(
            model_id="fake", input_modalities=[pb.MODALITY_TEXT], output_modalities=[pb.MODALITY_TEXT]
        )


def _status(step: Step) -> grpc.Status:
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=step.reason, domain="omnigate.dev"))
    details.append(info)
    if step.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(step.retry_after_s * 1e9))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    proto = status_pb2.Status(
        code=getattr(code_pb2, step.code.name), message=step.message or step.code.name, details=details
    )
    return rpc_status.to_status(proto)


class FakeGatewayServer:
    """Runs a ``FakeGateway`` on 127.0.0.1 (OS-chosen port), plaintext or TLS."""

    def __init__(self, fake: FakeGateway, server_credentials: grpc.ServerCredentials | None = None) -> None:
        self.fake = fake
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(_FakeServicer(fake), self.server)
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        if server_credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", server_credentials)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeGatewayServer:
        self.server.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.stop(grace=None)
