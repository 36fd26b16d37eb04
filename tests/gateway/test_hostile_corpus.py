"""The hostile-input corpus against real gateway processes: right status, clear message, in time.

Two gateways (real processes, a fake worker behind them, see conftest): "fetch" allows loopback so that
the misbehaving servers can be reached; "ssrf" has the default policy (private networks refused) with a
fixed name table and one loopback address (127.0.0.2) allowed as a stand-in for a public host. After the
corpus both must still be SERVING, and their memory must have stayed bounded.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from tests.support import media_factory as mf

from .corpus import (
    DENIED,
    FETCH_READ_TIMEOUT_S,
    FETCH_TOTAL_TIMEOUT_S,
    OK,
    SSRF_ALLOWED_NETWORK,
    SSRF_DENIED_DOMAIN,
    SSRF_HOSTS,
    Case,
    build_corpus,
    make_local_media_root,
    serve_corpus_files,
)

pytestmark = pytest.mark.slow

CORPUS = build_corpus()
# Peak resident memory a gateway may reach while taking the whole corpus (the largest legitimate item,
# a 25-megapixel PNG, decodes to ~100 MB), and how much its resident memory may grow over the corpus.
PEAK_RSS_LIMIT = 1024 * 1024 * 1024
RSS_GROWTH_LIMIT = 300 * 1024 * 1024


def test_the_corpus_is_large_and_varied():
    assert len(CORPUS) >= 150
    assert len({case.name for case in CORPUS}) == len(CORPUS)
    assert {case.expect for case in CORPUS} >= {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED",
                                                 "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}  # fmt: skip
    assert sum(case.gateway == "ssrf" for case in CORPUS) >= 50


def _memory(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Gateways:
    def __init__(self, services: dict, hostile, public) -> None:
        self.services = services
        self.hostile = hostile
        self.public = public
        self.baseline: dict[str, dict[str, int]] = {}
        self.channels = {name: grpc.insecure_channel(s.target) for name, s in services.items()}
        self.stubs = {name: gateway_pb2_grpc.GatewayServiceStub(c) for name, c in self.channels.items()}

    def url(self, template: str) -> str:
        return template.format(
            fetch=f"http://127.0.0.1:{self.hostile.port}",
            public=f"http://public.test:{self.public.port}",
            port=self.hostile.port,
        )

    def request(self, case: Case) -> pb.GenerateRequest:
        if case.inline is not None:
            source = pb.MediaSource(inline=pb.InlineMedia(data=case.inline))
        elif case.url is not None:
            source = pb.MediaSource(url=self.url(case.url))
        else:
            source = pb.MediaSource(path=case.path)
        parts = [pb.ContentPart(**{case.kind: source}) for _ in range(case.items)]
        parts.append(pb.ContentPart(text="What is this?"))
        return pb.GenerateRequest(
            messages=[pb.Message(role="user", content=parts)],
            parameters=pb.GenerationParameters(max_new_tokens=1),
            generation_mode=pb.GENERATION_MODE_TEXT,
            video=pb.VideoOptions(**case.video) if case.video else None,
        )


@pytest.fixture(scope="module")
def gateways(fake_worker, gateway_factory, hostile_server, second_loopback_server, tmp_path_factory):
    serve_corpus_files(hostile_server)
    serve_corpus_files(second_loopback_server)
    media_root = tmp_path_factory.mktemp("corpus-media")
    make_local_media_root(media_root)
    _, worker_target = fake_worker
    timeouts = {
        "OMNIGATE_GATEWAY_FETCH_TOTAL_TIMEOUT_S": str(FETCH_TOTAL_TIMEOUT_S),
        "OMNIGATE_GATEWAY_FETCH_READ_TIMEOUT_S": str(FETCH_READ_TIMEOUT_S),
        "OMNIGATE_GATEWAY_FETCH_CONNECT_TIMEOUT_S": "2",
    }
    services = {
        "fetch": gateway_factory(
            worker_target,
            {
                **timeouts,
                "OMNIGATE_GATEWAY_ALLOW_PRIVATE_NETWORKS": "true",
                "OMNIGATE_GATEWAY_LOCAL_MEDIA_ROOT": str(media_root),
            },
        ),
        "ssrf": gateway_factory(
            worker_target,
            {
                **timeouts,
                "OMNIGATE_GATEWAY_ALLOW_PRIVATE_NETWORKS": "false",
                "OMNIGATE_GATEWAY_ALLOWED_NETWORKS": SSRF_ALLOWED_NETWORK,
                "OMNIGATE_GATEWAY_DENIED_MEDIA_DOMAINS": SSRF_DENIED_DOMAIN,
            },
            hosts=SSRF_HOSTS,
        ),
    }
    g = Gateways(services, hostile_server, second_loopback_server)
    # Warm up (codecs loaded, first allocations made) before taking the memory baseline.
    warmup = [
        Case("warmup/png", "image", OK, (), inline=mf.make_png(640, 480)),
        Case("warmup/wav", "audio", OK, (), inline=mf.make_wav(2.0)),
        Case("warmup/mp4", "video", OK, (), inline=mf.make_video("mp4", "h264", seconds=2.0, w=320, h=240)),
    ]
    for name, stub in g.stubs.items():
        for case in warmup:
            list(stub.Generate(g.request(case), timeout=60))
        g.baseline[name] = _memory(services[name].process.pid)
    yield g
    for channel in g.channels.values():
        channel.close()


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_hostile_input(gateways, hostile_server, case):
    loopback_requests = len(hostile_server.requests)
    started = time.monotonic()
    try:
        events = list(
            gateways.stubs[case.gateway].Generate(gateways.request(case), timeout=case.limit_s + 30)
        )
        code, details = "OK", ""
        assert events[-1].WhichOneof("event") == "summary"
    except grpc.RpcError as error:
        code, details = error.code().name, error.details() or ""
    elapsed = time.monotonic() - started
    assert code == case.expect, f"{case.name}: {code} {details[:500]!r}"
    assert len(details) < 1000, f"{case.name}: a {len(details)}-character message"
    if case.fragments:
        assert any(f in details.lower() for f in case.fragments), f"{case.name}: {details!r}"
    if code != "OK":
        assert details and "internal error" not in details.lower()
    assert elapsed <= case.limit_s, f"{case.name} took {elapsed:.1f} s; its limit is {case.limit_s} s"
    if case.gateway == "ssrf" and case.expect == DENIED:
        # Refused on the address check: the loopback server never saw a connection.
        assert len(hostile_server.requests) == loopback_requests, case.name


def test_gateways_stay_serving_with_bounded_memory(gateways):
    for name, service in gateways.services.items():
        assert service.process.poll() is None, f"{name} exited:\n{service.log_tail()}"
        assert _serving(service.target), name
        memory = _memory(service.process.pid)
        baseline = gateways.baseline[name]
        assert memory["VmHWM"] < PEAK_RSS_LIMIT, (name, memory, baseline)
        assert memory["VmRSS"] - baseline["VmRSS"] < RSS_GROWTH_LIMIT, (name, memory, baseline)
        print(f"{name}: baseline {baseline}, after the corpus {memory}")
