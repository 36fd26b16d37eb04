"""Tracing, request ids and structured logs across the gateway and the worker (issue 6).

The trace tests run a real gateway and a real worker (real gRPC servers on OS-chosen loopback ports, the
tiny Qwen2.5-Omni through transformers, media from a real HTTP server) inside the test's event loop, with
an ``InMemorySpanExporter`` installed for both services. The request id and log tests use the session's
real processes (``omni_stack``) and read their JSON log files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from prometheus_client import CollectorRegistry

from omnigate import tracing
from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from tests.support import media_factory
from tests.support.stack import MODELS_DIR, Stack

pytestmark = pytest.mark.slow

OMNI = MODELS_DIR / "tiny-qwen2.5-omni"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
# A caller's W3C trace context (https://www.w3.org/TR/trace-context/#examples-of-http-traceparent-headers).
CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"


def _request(
    *parts: pb.ContentPart, mode=pb.GENERATION_MODE_TEXT, max_new_tokens: int = 4
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role="user", content=list(parts))],
        parameters=pb.GenerationParameters(max_new_tokens=max_new_tokens),
        generation_mode=mode,
    )


# ---- a gateway and a worker in this process ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from omnigate_worker.engine import loading
    from omnigate_worker.engine.transformers_engine import TransformersEngine
    from omnigate_worker.settings import WorkerSettings

    if not (OMNI / "config.json").exists():
        pytest.fail(f"{OMNI} is missing: run `make models` (make test does it first)")
    engine = TransformersEngine(
        loading.load(str(OMNI), "cpu", "auto", "auto", False), WorkerSettings(model=str(OMNI)), str(OMNI)
    )
    engine.warmup()
    return engine


@dataclass
class InProcess:
    target: str
    spans: InMemorySpanExporter


@pytest.fixture
async def in_process(engine) -> AsyncIterator[InProcess]:
    """Worker and gateway servers in this event loop, both exporting their spans to one in-memory exporter."""
    from omnigate_gateway.auth import Authenticator
    from omnigate_gateway.core import GatewayCore
    from omnigate_gateway.grpc_api.server import GatewayServicer
    from omnigate_gateway.grpc_api.server import build_server as build_gateway
    from omnigate_gateway.media.fetch import MediaFetcher
    from omnigate_gateway.media.ingest import MediaIngestor
    from omnigate_gateway.metrics import GatewayMetrics
    from omnigate_gateway.settings import GatewaySettings
    from omnigate_gateway.workers.pool import WorkerPool
    from omnigate_worker.metrics import WorkerMetrics
    from omnigate_worker.scheduler import Scheduler
    from omnigate_worker.server import SERVICE_NAME as WORKER_SERVICE
    from omnigate_worker.server import WorkerServicer
    from omnigate_worker.server import build_server as build_worker
    from omnigate_worker.settings import WorkerSettings

    exporter = InMemorySpanExporter()
    tracing.configure(tracing.GATEWAY, exporter=exporter)
    tracing.configure(tracing.WORKER, exporter=exporter)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(tracing.shutdown, tracing.WORKER)
        stack.callback(tracing.shutdown, tracing.GATEWAY)

        worker_settings = WorkerSettings(model=str(OMNI), port=0, metrics_port=-1)
        worker_metrics = WorkerMetrics(CollectorRegistry())
        scheduler = Scheduler(engine, worker_settings, worker_metrics)
        scheduler.start()
        stack.callback(scheduler.shutdown)
        worker_servicer = WorkerServicer(worker_settings, worker_metrics)
        worker_servicer.attach(engine, scheduler)
        worker_health = health.aio.HealthServicer()
        await worker_health.set(WORKER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        worker_server, worker_port = build_worker(worker_servicer, worker_settings, worker_health)
        await worker_server.start()
        stack.push_async_callback(worker_server.stop, None)

        settings = GatewaySettings(
            port=0,
            metrics_port=-1,
            worker_target=f"127.0.0.1:{worker_port}",
            allow_private_networks=True,  # the media server is on loopback
        )
        metrics = GatewayMetrics(CollectorRegistry())
        fetcher = MediaFetcher(settings.fetch_limits())
        stack.push_async_callback(fetcher.aclose)
        ingestor = MediaIngestor(fetcher, settings, metrics)
        stack.callback(ingestor.close)
        workers = WorkerPool(settings, metrics)
        workers.start()
        stack.push_async_callback(workers.close)
        deadline = time.monotonic() + 30
        while workers.info is None:
            assert time.monotonic() < deadline, "the in-process worker is not ready"
            await asyncio.sleep(0.02)
        core = GatewayCore(settings, workers, ingestor, metrics, Authenticator(settings, metrics))
        gateway_server, gateway_port = build_gateway(
            GatewayServicer(core), settings, health.aio.HealthServicer()
        )
        await gateway_server.start()
        stack.push_async_callback(gateway_server.stop, None)
        yield InProcess(f"127.0.0.1:{gateway_port}", exporter)


async def _generate(target: str, request: pb.GenerateRequest, metadata=()) -> tuple[list, dict[str, str]]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(request, metadata=metadata, timeout=120)
        events = [event async for event in call]
        return events, dict(await call.initial_metadata())


async def _finished_spans(exporter: InMemorySpanExporter, wanted: set[str]) -> list[ReadableSpan]:
    """The exported spans once every name in ``wanted`` is there (the worker's end just after the reply)."""
    deadline = time.monotonic() + 10
    while True:
        spans = list(exporter.get_finished_spans())
        if wanted <= {span.name for span in spans} or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)


def _by_name(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def _one(spans: dict[str, list[ReadableSpan]], name: str) -> ReadableSpan:
    assert len(spans.get(name, [])) == 1, f"expected one {name} span, got {sorted(spans)}"
    return spans[name][0]


def _child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id


def _service(span: ReadableSpan) -> str:
    return span.resource.attributes["service.name"]


SLACK_NS = 5_000_000  # spans with explicit times convert monotonic readings to wall-clock ones


async def test_one_trace_covers_gateway_and_worker(in_process, media_server):
    """Acceptance: one request, one trace from the gateway's request span to the worker's decode loop."""
    image = media_server.serve("/tracing/picture.png", media_factory.make_png(48, 32))
    audio = media_server.serve("/tracing/sound.wav", media_factory.make_wav(0.5))
    request = _request(
        pb.ContentPart(image=pb.MediaSource(url=image)),
        pb.ContentPart(audio=pb.MediaSource(url=audio)),
        pb.ContentPart(text="What is in this picture and this sound?"),
    )
    events, metadata = await _generate(in_process.target, request, [("x-request-id", "trace-test.1")])
    assert events[-1].HasField("summary") and events[-1].summary.output_tokens > 0
    assert metadata["x-request-id"] == "trace-test.1"

    wanted = {
        "gateway.generate",
        "gateway.fetch",
        "gateway.decode",
        "gateway.worker",
        "gateway.stream",
        "worker.generate",
        "worker.receive",
        "worker.queue",
        "worker.preprocess",
        "worker.prefill",
        "worker.decode",
        "worker.stream",
    }
    spans = await _finished_spans(in_process.spans, wanted)
    named = _by_name(spans)
    assert wanted <= set(named), f"missing spans: {sorted(wanted - set(named))}"
    assert len({span.context.trace_id for span in spans}) == 1, "the request's spans are in several traces"

    # The gateway: the request span is the root (no caller context); fetch and decode per media item.
    root = _one(named, "gateway.generate")
    assert root.parent is None and root.kind is SpanKind.SERVER
    assert _service(root) == tracing.GATEWAY
    assert root.attributes["omnigate.request_id"] == "trace-test.1"
    assert root.attributes["rpc.grpc.status_code"] == "OK"
    assert root.attributes["omnigate.mode"] == "text"
    for name in ("gateway.fetch", "gateway.decode"):
        assert sorted(span.attributes["omnigate.modality"] for span in named[name]) == ["audio", "image"]
        assert all(_child_of(span, root) for span in named[name]), name
        assert all(_service(span) == tracing.GATEWAY for span in named[name])
    for fetch in named["gateway.fetch"]:
        decode = next(
            d
            for d in named["gateway.decode"]
            if d.attributes["omnigate.modality"] == fetch.attributes["omnigate.modality"]
        )
        assert fetch.end_time <= decode.start_time, "an item is decoded after it is fetched"
        assert fetch.attributes["omnigate.media.bytes"] == decode.attributes["omnigate.media.bytes"] > 0
    call = _one(named, "gateway.worker")
    assert _child_of(call, root) and call.kind is SpanKind.CLIENT
    assert max(d.end_time for d in named["gateway.decode"]) <= call.start_time, (
        "media is ready before the call"
    )
    assert _child_of(_one(named, "gateway.stream"), root)

    # The worker: its request span continues the gateway's call span, received in the gRPC metadata.
    served = _one(named, "worker.generate")
    assert served.kind is SpanKind.SERVER and _service(served) == tracing.WORKER
    assert _child_of(served, call) and served.parent.is_remote
    assert call.start_time <= served.start_time and served.end_time <= call.end_time
    stages = {
        name: _one(named, name) for name in wanted if name.startswith("worker.") and name != "worker.generate"
    }
    for name, span in stages.items():
        assert _child_of(span, served), f"{name} is not a child of worker.generate"
        assert _service(span) == tracing.WORKER
        assert (
            served.start_time - SLACK_NS <= span.start_time <= span.end_time <= served.end_time + SLACK_NS
        ), name
    receive, queue, preprocess = stages["worker.receive"], stages["worker.queue"], stages["worker.preprocess"]
    prefill, decode = stages["worker.prefill"], stages["worker.decode"]
    assert receive.end_time <= queue.start_time + SLACK_NS
    assert (
        queue.start_time - SLACK_NS <= preprocess.start_time
        and preprocess.end_time <= queue.end_time + SLACK_NS
    )
    assert (
        queue.end_time - SLACK_NS <= prefill.start_time and prefill.end_time - SLACK_NS <= decode.start_time
    )
    assert decode.attributes["omnigate.output_tokens"] == events[-1].summary.output_tokens
    assert decode.attributes["omnigate.prompt_tokens"] == events[-1].summary.prompt_tokens
    assert stages["worker.stream"].start_time >= prefill.start_time


async def test_speech_spans_and_a_callers_trace_context(in_process):
    """A caller's traceparent is continued; a speech request (thinker row, batched talker, vocoder thread)
    shows its talker prefill, its talker's decoding and each vocoded chunk in the worker's trace."""
    request = _request(pb.ContentPart(text="Say something."), mode=pb.GENERATION_MODE_AUDIO, max_new_tokens=3)
    events, metadata = await _generate(in_process.target, request, [("traceparent", CALLER_TRACEPARENT)])
    assert any(event.HasField("audio") for event in events)
    assert GENERATED_ID.fullmatch(metadata["x-request-id"])

    wanted = {
        "worker.generate",
        "worker.vocode",
        "worker.talker",
        "worker.talker_prefill",
        "gateway.generate",
    }
    spans = await _finished_spans(in_process.spans, wanted)
    named = _by_name(spans)
    assert {format_trace_id(span.context.trace_id) for span in spans} == {CALLER_TRACE_ID}
    root = _one(named, "gateway.generate")
    assert root.parent.is_remote and format_span_id(root.parent.span_id) == CALLER_SPAN_ID
    assert root.attributes["omnigate.mode"] == "audio"
    served = _one(named, "worker.generate")
    decode = _one(named, "worker.decode")
    assert _child_of(decode, served)
    assert _child_of(_one(named, "worker.prefill"), served)
    talker = _one(named, "worker.talker")
    assert _child_of(talker, served) and talker.attributes["omnigate.codes"] > 0
    assert _child_of(_one(named, "worker.talker_prefill"), served)
    chunks = named["worker.vocode"]
    assert chunks and all(_child_of(span, served) for span in chunks)
    assert sorted(span.attributes["omnigate.sequence"] for span in chunks) == list(range(len(chunks)))
    assert all(decode.start_time <= span.start_time <= decode.end_time for span in chunks)


async def test_errors_end_the_trace_with_their_code(in_process, media_server):
    """A media URL that fails ends the gateway's spans with the error; no worker call is made."""
    missing = media_server.url("/tracing/missing.png")
    request = _request(pb.ContentPart(image=pb.MediaSource(url=missing)), pb.ContentPart(text="hi"))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _generate(in_process.target, request, [("x-request-id", "bad-media")])
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.value.initial_metadata())["x-request-id"] == "bad-media"
    spans = await _finished_spans(in_process.spans, {"gateway.generate", "gateway.fetch"})
    named = _by_name(spans)
    root = _one(named, "gateway.generate")
    assert root.attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    assert root.status.is_ok, "a client's bad input is not a server error"
    fetch = _one(named, "gateway.fetch")
    assert not fetch.status.is_ok and _child_of(fetch, root)
    assert "gateway.worker" not in named and "worker.generate" not in named


async def test_get_model_info_has_its_own_server_span(in_process):
    """GetModelInfo is a traced call too: one server span, continuing the caller's trace."""
    async with grpc.aio.insecure_channel(in_process.target) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(),
            metadata=[("x-request-id", "info-1"), ("traceparent", CALLER_TRACEPARENT)],
            timeout=30,
        )
        info = await call
        assert info.model_id and dict(await call.initial_metadata())["x-request-id"] == "info-1"
    spans = await _finished_spans(in_process.spans, {"gateway.get_model_info"})
    span = _one(_by_name(spans), "gateway.get_model_info")
    assert span.kind is SpanKind.SERVER and format_trace_id(span.context.trace_id) == CALLER_TRACE_ID
    assert span.attributes["omnigate.request_id"] == "info-1"
    assert span.attributes["rpc.grpc.status_code"] == "OK"


# ---- request ids and JSON logs of the real processes ---------------------------------------------------


def _json_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return lines


def _access_lines(stack: Stack, request_id: str) -> tuple[list[dict], list[dict]]:
    """The gateway's and the worker's access log lines for ``request_id`` (waits for both)."""
    deadline = time.monotonic() + 15
    while True:
        gateway = [
            line
            for line in _json_lines(stack.gateway.log_path)
            if line.get("request_id") == request_id and line["logger"] == "omnigate_gateway.access"
        ]
        worker = [
            line
            for line in _json_lines(stack.worker.log_path)
            if line.get("request_id") == request_id and line["logger"] == "omnigate_worker.access"
        ]
        if (gateway and worker) or time.monotonic() > deadline:
            return gateway, worker
        time.sleep(0.1)


def _gateway_access_lines(stack: Stack, request_id: str) -> list[dict]:
    """The gateway's access lines for ``request_id`` (waits up to 15 s for the first)."""
    deadline = time.monotonic() + 15
    while True:
        lines = [
            line
            for line in _json_lines(stack.gateway.log_path)
            if line.get("request_id") == request_id and line["logger"] == "omnigate_gateway.access"
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def _call(stack: Stack, request: pb.GenerateRequest, metadata=()) -> tuple[list, dict[str, str]]:
    with grpc.insecure_channel(stack.gateway.target) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(request, metadata=metadata, timeout=120)
        events = list(call)
        return events, dict(call.initial_metadata())


def test_request_id_round_trip_and_json_logs(omni_stack):
    """A caller's request id comes back in the initial metadata, and both services log the request as JSON
    lines carrying it (and the caller's trace id: the context passes through with no exporter configured)."""
    events, metadata = _call(
        omni_stack,
        _request(pb.ContentPart(text="Hello")),
        [("x-request-id", "client-Req_42.a"), ("traceparent", CALLER_TRACEPARENT)],
    )
    assert metadata["x-request-id"] == "client-Req_42.a"
    tokens = events[-1].summary.output_tokens
    gateway, worker = _access_lines(omni_stack, "client-Req_42.a")
    assert len(gateway) == 1 and len(worker) == 1, (
        omni_stack.gateway.log_tail(),
        omni_stack.worker.log_tail(),
    )
    for line, service in ((gateway[0], "omnigate-gateway"), (worker[0], "omnigate-worker")):
        assert line["service"] == service
        assert line["level"] == "INFO" and line["time"]
        assert line["code"] == "OK" and line["mode"] == "text"
        assert line["output_tokens"] == tokens
        assert line["duration_s"] > 0
        assert line["trace_id"] == CALLER_TRACE_ID and len(line["span_id"]) == 16
    assert worker[0]["prompt_tokens"] == events[-1].summary.prompt_tokens
    # The worker ran the request inside the gateway's: its line is no later than the gateway's.
    assert worker[0]["time"] <= gateway[0]["time"]


@pytest.mark.parametrize(
    "sent",
    [None, "", "has spaces", "x" * 129, "semi;colon", "../path"],
    ids=["none", "empty", "spaces", "too-long", "punctuation", "slash"],
)
def test_request_id_generated_when_missing_or_unusable(omni_stack, sent):
    metadata = [] if sent is None else [("x-request-id", sent)]
    _, returned = _call(omni_stack, _request(pb.ContentPart(text="Hi"), max_new_tokens=1), metadata)
    request_id = returned["x-request-id"]
    assert GENERATED_ID.fullmatch(request_id) and request_id != sent
    gateway, worker = _access_lines(omni_stack, request_id)
    assert gateway and worker


def test_errors_carry_the_request_id(omni_stack):
    """A refused request still returns its request id (initial metadata) and is logged with its code."""
    with grpc.insecure_channel(omni_stack.gateway.target) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(
            pb.GenerateRequest(generation_mode=pb.GENERATION_MODE_TEXT),
            metadata=[("x-request-id", "refused-1")],
            timeout=60,
        )
        with pytest.raises(grpc.RpcError) as error:
            list(call)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.value.initial_metadata())["x-request-id"] == "refused-1"
    lines = _gateway_access_lines(omni_stack, "refused-1")
    assert len(lines) == 1 and lines[0]["code"] == "INVALID_ARGUMENT", omni_stack.gateway.log_tail()


def test_get_model_info_writes_an_access_line(omni_stack):
    with grpc.insecure_channel(omni_stack.gateway.target) as channel:
        gateway_pb2_grpc.GatewayServiceStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), metadata=[("x-request-id", "info-access-1")], timeout=30
        )
    lines = _gateway_access_lines(omni_stack, "info-access-1")
    assert len(lines) == 1, omni_stack.gateway.log_tail()
    assert lines[0]["rpc"] == "GetModelInfo" and lines[0]["code"] == "OK" and lines[0]["mode"] == "none"
