"""Security with real processes on loopback: mutual TLS between gateway and worker (certificates made by the
test, reloaded on change), TLS on the public port, API keys (missing, wrong, revoked), per-key rate and
concurrency limits, message-size limits, reflection off, and internal errors that reveal nothing.

One worker and one gateway serve every test here, configured the way a locked-down deployment would be.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from omnigate import status
from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from omnigate.worker.v1 import worker_pb2, worker_pb2_grpc
from omnigate_gateway.grpc_api.server import GatewayServicer, build_server
from omnigate_gateway.settings import GatewaySettings
from omnigate_gateway.workers import channels
from tests.support import media_factory
from tests.support.certs import Authority, Issued, secret_volume
from tests.support.stack import MODELS_DIR, Service, start_service, wait_serving

pytestmark = pytest.mark.slow

WORKER_NAME = "worker.omnigate.test"  # the only name in the worker's certificate (not 127.0.0.1)
SERVING = health_pb2.HealthCheckResponse.SERVING
MiB = 1024 * 1024

KEYS = {
    "alice": "alice-0f9e8d7c6b5a49382716",
    "dave": "dave-1a2b3c4d5e6f70819203",
    "limited": "limited-5e4d3c2b1a0f9e8d7c6b",
    "single": "single-99aa88bb77cc66dd55ee",
}
KEYS_FILE = f"""# name:secret[:option=value...]
alice:{KEYS["alice"]}
dave:{KEYS["dave"]}
limited:{KEYS["limited"]}:rps=0.05:burst=2
single:{KEYS["single"]}:concurrency=1
"""


@dataclass
class Pki:
    dir: Path
    ca: Authority
    worker: Issued
    gateway_client: Issued
    rogue_client: Issued


@dataclass
class SecureStack:
    pki: Pki
    worker: Service
    gateway: Service
    worker_health_port: int
    gateway_health_port: int

    def gateway_channel(self) -> grpc.Channel:
        return grpc.secure_channel(self.gateway.target, grpc.ssl_channel_credentials(self.pki.ca.cert_pem))

    def worker_channel(self, client: Issued | None) -> grpc.Channel:
        """A TLS channel to the worker presenting ``client`` (None = no client certificate)."""
        credentials = grpc.ssl_channel_credentials(
            self.pki.ca.cert_pem, client.key_pem if client else None, client.cert_pem if client else None
        )
        options = [("grpc.ssl_target_name_override", WORKER_NAME)]
        return grpc.secure_channel(self.worker.target, credentials, options=options)


def _with_port(service: Service, port: int) -> Service:
    return Service(service.name, service.process, port, service.metrics_port, service.log_path)


def _health_port(workdir: Path, name: str) -> int:
    return json.loads((workdir / f"{name}.ports.json").read_text())["health_port"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority("omnigate test CA")
    pki = Pki(
        directory,
        ca,
        worker=ca.issue("worker", dns=(WORKER_NAME,)),
        gateway_client=ca.issue("gateway", client=True),
        rogue_client=Authority("rogue CA").issue("gateway", client=True),
    )
    # Laid out like the chart's Secret volumes (tls.crt, tls.key, ca.crt behind the kubelet's ..data link).
    _worker_secret(pki, pki.worker)
    for name, issued in (("gateway", pki.gateway_client), ("public", ca.issue("public", ips=("127.0.0.1",)))):
        secret_volume(
            directory / name, {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem, "ca.crt": ca.cert_pem}
        )
    secret_volume(directory / "auth", {"api-keys": KEYS_FILE.encode()})
    return pki


def _worker_secret(pki: Pki, issued: Issued) -> None:
    secret_volume(
        pki.dir / "worker", {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem, "ca.crt": pki.ca.cert_pem}
    )


@pytest.fixture(scope="module")
def secure_stack(pki, tmp_path_factory) -> Iterator[SecureStack]:
    workdir = tmp_path_factory.mktemp("secure")
    d = pki.dir
    worker = start_service(
        "worker",
        "omnigate_worker.main",
        {
            "OMNIGATE_WORKER_MODEL": str(MODELS_DIR / "tiny-qwen2.5-omni"),
            "OMNIGATE_WORKER_TLS_CERT_FILE": str(d / "worker/tls.crt"),
            "OMNIGATE_WORKER_TLS_KEY_FILE": str(d / "worker/tls.key"),
            "OMNIGATE_WORKER_TLS_CLIENT_CA_FILE": str(d / "worker/ca.crt"),
            "OMNIGATE_WORKER_HEALTH_PORT": "0",
            "OMNIGATE_WORKER_MAX_MESSAGE_BYTES": str(2 * MiB),
        },
        workdir,
    )
    gateway = None
    try:
        gateway = start_service(
            "gateway",
            "omnigate_gateway.main",
            {
                "OMNIGATE_GATEWAY_WORKER_TARGET": worker.target,
                "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.5",
                "OMNIGATE_GATEWAY_ALLOW_PRIVATE_NETWORKS": "true",  # the test's media server is on loopback
                "OMNIGATE_GATEWAY_HTTP_PORT": "-1",
                "OMNIGATE_GATEWAY_WORKER_TLS_CA_FILE": str(d / "gateway/ca.crt"),
                "OMNIGATE_GATEWAY_WORKER_TLS_CERT_FILE": str(d / "gateway/tls.crt"),
                "OMNIGATE_GATEWAY_WORKER_TLS_KEY_FILE": str(d / "gateway/tls.key"),
                "OMNIGATE_GATEWAY_WORKER_TLS_SERVER_NAME": WORKER_NAME,
                "OMNIGATE_GATEWAY_TLS_CERT_FILE": str(d / "public/tls.crt"),
                "OMNIGATE_GATEWAY_TLS_KEY_FILE": str(d / "public/tls.key"),
                "OMNIGATE_GATEWAY_HEALTH_PORT": "0",
                "OMNIGATE_GATEWAY_API_KEYS_FILE": str(d / "auth/api-keys"),
                "OMNIGATE_GATEWAY_API_KEYS_RELOAD_INTERVAL_S": "0.2",
                "OMNIGATE_GATEWAY_REFLECTION": "false",
                "OMNIGATE_GATEWAY_MAX_MESSAGE_BYTES": str(1 * MiB),
            },
            workdir,
        )
        stack = SecureStack(
            pki, worker, gateway, _health_port(workdir, "worker"), _health_port(workdir, "gateway")
        )
        # Both main ports speak TLS only: readiness is read on the plaintext health ports (as kubelet does).
        wait_serving(_with_port(worker, stack.worker_health_port))
        wait_serving(_with_port(gateway, stack.gateway_health_port))
        yield stack
    finally:
        if gateway is not None:
            gateway.stop()
        worker.stop()


def _request(*parts: pb.ContentPart, max_new_tokens: int = 2) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role="user", content=list(parts) or [pb.ContentPart(text="Hello")])],
        parameters=pb.GenerationParameters(max_new_tokens=max_new_tokens),
        generation_mode=pb.GENERATION_MODE_TEXT,
    )


def _generate(
    channel: grpc.Channel, key: str | None, request: pb.GenerateRequest | None = None, *, header="bearer"
):
    metadata = ()
    if key is not None:
        metadata = (("authorization", f"Bearer {key}"),) if header == "bearer" else (("x-api-key", key),)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    return list(stub.Generate(request or _request(), metadata=metadata, timeout=120))


def _error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        fn(*args, **kwargs)
    return error.value


def _retry_delay_s(error: grpc.RpcError) -> float | None:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def _health(channel: grpc.Channel, service: str = "") -> int:
    return (
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        .status
    )


def _gateway_metric(stack: SecureStack, name: str, labels: str) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{stack.gateway.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- mutual TLS between gateway and worker -----------------------------------------------------------------


def test_worker_refuses_clients_without_a_valid_certificate(secure_stack):
    plaintext = grpc.insecure_channel(secure_stack.worker.target)
    for why, channel in {
        "plaintext": plaintext,
        "no client certificate": secure_stack.worker_channel(None),
        "certificate from another CA": secure_stack.worker_channel(secure_stack.pki.rogue_client),
    }.items():
        with channel:
            error = _error(_health, channel)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, why
    # The same check with the gateway's certificate passes: the refusals above are about the certificate.
    with secure_stack.worker_channel(secure_stack.pki.gateway_client) as channel:
        assert _health(channel) == SERVING


def test_gateway_with_the_right_certificate_serves_generate_over_mtls(secure_stack):
    with secure_stack.gateway_channel() as channel:
        events = _generate(channel, KEYS["alice"], _request(max_new_tokens=3))
    assert events[-1].WhichOneof("event") == "summary"
    assert events[-1].summary.output_tokens >= 1


def test_public_port_speaks_tls_only_and_health_port_serves_health_only(secure_stack):
    with grpc.insecure_channel(secure_stack.gateway.target) as channel:
        assert _error(_health, channel).code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{secure_stack.gateway_health_port}") as channel:
        assert _health(channel) == SERVING
        assert _error(_generate, channel, KEYS["alice"]).code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(f"127.0.0.1:{secure_stack.worker_health_port}") as channel:
        assert _health(channel) == SERVING
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        error = _error(stub.GetModelInfo, worker_pb2.GetModelInfoRequest(), timeout=10)
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def _peer_certificate(port: int, pki: Pki) -> x509.Certificate:
    """The certificate the worker presents to a new connection (a real handshake with the gateway's cert)."""
    context = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    context.set_alpn_protocols(["h2"])
    cert, key = pki.gateway_client.write(pki.dir / "client-copy", "gateway")
    context.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=WORKER_NAME) as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))


def test_worker_picks_up_a_renewed_certificate_without_restarting(secure_stack):
    pki = secure_stack.pki
    port = secure_stack.worker.grpc_port
    assert _peer_certificate(port, pki) == pki.worker.certificate
    renewed = pki.ca.issue("worker", dns=(WORKER_NAME,))
    _worker_secret(pki, renewed)  # what the kubelet does when cert-manager renews the Secret
    deadline = time.monotonic() + 15
    while _peer_certificate(port, pki) != renewed.certificate:
        assert time.monotonic() < deadline, "the worker kept its old certificate"
        time.sleep(0.3)
    assert secure_stack.worker.process.poll() is None
    pki.worker = renewed
    with secure_stack.gateway_channel() as channel:
        assert _generate(channel, KEYS["alice"])[-1].WhichOneof("event") == "summary"


# -- authentication ------------------------------------------------------------------------------------------


def test_no_key_and_wrong_key_are_unauthenticated_but_health_is_open(secure_stack):
    with secure_stack.gateway_channel() as channel:
        for key in (None, "not-a-key", KEYS["alice"] + "x"):
            error = _error(_generate, channel, key)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, key
            assert "API key" in error.details()
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        error = _error(stub.GetModelInfo, pb.GetModelInfoRequest(), timeout=10)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        info = stub.GetModelInfo(
            pb.GetModelInfoRequest(), metadata=(("x-api-key", KEYS["alice"]),), timeout=10
        )
        assert info.model_id
        assert _generate(channel, KEYS["alice"], header="x-api-key")[-1].WhichOneof("event") == "summary"
        assert _health(channel) == SERVING  # health checks need no key
    assert (
        _gateway_metric(secure_stack, "omnigate_gateway_rejected_requests_total", 'reason="unauthenticated"')
        >= 4
    )


def test_revoked_key_is_refused_without_a_restart(secure_stack):
    with secure_stack.gateway_channel() as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        dave = (("authorization", f"Bearer {KEYS['dave']}"),)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=dave, timeout=10).model_id
        kept = "\n".join(line for line in KEYS_FILE.splitlines() if not line.startswith("dave:"))
        secret_volume(secure_stack.pki.dir / "auth", {"api-keys": kept.encode()})
        deadline = time.monotonic() + 10
        while True:
            try:
                stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=dave, timeout=10)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() < deadline, "the removed key is still accepted"
            time.sleep(0.1)
        assert _error(_generate, channel, KEYS["dave"]).code() == grpc.StatusCode.UNAUTHENTICATED
        assert _generate(channel, KEYS["alice"])[-1].WhichOneof("event") == "summary"
    assert secure_stack.gateway.process.poll() is None


# -- per-key limits ------------------------------------------------------------------------------------------


def test_rate_limit_applies_per_key_with_retry_info(secure_stack):
    with secure_stack.gateway_channel() as channel:
        # `limited` has rps=0.05, burst=2: two requests pass, a third within 20 s is refused.
        for _ in range(2):
            assert _generate(channel, KEYS["limited"])[-1].WhichOneof("event") == "summary"
        error = _error(_generate, channel, KEYS["limited"])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit" in error.details()
        delay = _retry_delay_s(error)
        assert delay is not None and 0 < delay <= 20.0
        # Another key is not affected.
        assert _generate(channel, KEYS["alice"])[-1].WhichOneof("event") == "summary"
    assert (
        _gateway_metric(secure_stack, "omnigate_gateway_rejected_requests_total", 'reason="rate_limited"')
        >= 1
    )


class StallingMediaServer:
    """Serves one PNG, but only once ``release`` is set: keeps a Generate stream open while it waits."""

    def __init__(self, body: bytes) -> None:
        self.requested = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server API
                outer.requested.set()
                outer.release.wait(60)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slow.png"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_concurrency_limit_refuses_a_second_open_stream_of_the_same_key(secure_stack):
    image = pb.ContentPart(image=pb.MediaSource(url=""))
    with StallingMediaServer(media_factory.make_png()) as media, secure_stack.gateway_channel() as channel:
        image.image.url = media.url
        slow = _request(image, pb.ContentPart(text="What is this?"))
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_generate, channel, KEYS["single"], slow)
            assert media.requested.wait(60), "the gateway never fetched the image"
            error = _error(_generate, channel, KEYS["single"])
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already has 1 Generate stream" in error.details()
            assert _retry_delay_s(error) is not None
            # Other keys are not held up by `single`'s open stream.
            assert _generate(channel, KEYS["alice"])[-1].WhichOneof("event") == "summary"
            media.release.set()
            assert first.result(timeout=120)[-1].WhichOneof("event") == "summary"
        # The slot was given back when the stream ended.
        assert _generate(channel, KEYS["single"])[-1].WhichOneof("event") == "summary"
    assert (
        _gateway_metric(
            secure_stack, "omnigate_gateway_rejected_requests_total", 'reason="concurrency_limited"'
        )
        >= 1
    )


# -- message sizes, reflection -------------------------------------------------------------------------------


def test_over_limit_messages_get_resource_exhausted_and_the_services_keep_serving(secure_stack):
    big_image = pb.ContentPart(
        image=pb.MediaSource(inline=pb.InlineMedia(data=b"\x89PNG" + b"\0" * (MiB + 16)))
    )
    with secure_stack.gateway_channel() as channel:
        error = _error(_generate, channel, KEYS["alice"], _request(big_image))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _health(channel) == SERVING
        assert _generate(channel, KEYS["alice"])[-1].WhichOneof("event") == "summary"
    # The worker's own limit (2 MiB here) applies to what reaches it directly.
    with secure_stack.worker_channel(secure_stack.pki.gateway_client) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        chunk = worker_pb2.GenerateRequest(
            media_chunk=worker_pb2.MediaChunk(media_id=0, data=b"\0" * (3 * MiB))
        )
        error = _error(lambda: list(stub.Generate(iter([chunk]), timeout=30)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _health(channel) == SERVING


def _list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_reflection_off_hides_the_services(secure_stack):
    with secure_stack.gateway_channel() as channel:
        assert _error(_list_services, channel).code() == grpc.StatusCode.UNIMPLEMENTED
    # The worker keeps reflection on (the default): the same call lists its services.
    with secure_stack.worker_channel(secure_stack.pki.gateway_client) as channel:
        assert "omnigate.worker.v1.WorkerService" in _list_services(channel)


# -- the gateway's worker channels (in-process TLS server) ---------------------------------------------------


async def test_worker_channel_verifies_the_configured_server_name_and_reports_file_changes(pki, tmp_path):
    from omnigate import tls

    servicer = health.aio.HealthServicer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    d = pki.dir
    credentials = tls.server_credentials(
        str(d / "worker/tls.crt"), str(d / "worker/tls.key"), str(d / "worker/ca.crt")
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    base = {
        "worker_tls_ca_file": str(d / "gateway/ca.crt"),
        "worker_tls_cert_file": str(d / "gateway/tls.crt"),
        "worker_tls_key_file": str(d / "gateway/tls.key"),
    }
    try:
        settings = GatewaySettings(**base, worker_tls_server_name=WORKER_NAME)
        async with channels.worker_channel(f"127.0.0.1:{port}", settings) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert reply.status == SERVING
        # Without the override the certificate (naming only WORKER_NAME) does not match 127.0.0.1.
        async with channels.worker_channel(f"127.0.0.1:{port}", GatewaySettings(**base)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)
    assert channels.credentials_version(GatewaySettings()) == ()
    before = channels.credentials_version(settings)
    await asyncio.sleep(0.01)
    renewed = pki.ca.issue("gateway", client=True)
    secret_volume(
        d / "gateway", {"tls.crt": renewed.cert_pem, "tls.key": renewed.key_pem, "ca.crt": pki.ca.cert_pem}
    )
    assert channels.credentials_version(settings) != before


# -- internal errors -----------------------------------------------------------------------------------------


class FakeExplodingCore:
    """A FAKE GatewayCore (control flow only): every call fails with an unexpected exception whose text
    must never reach the caller."""

    async def generate(self, request, call):
        raise RuntimeError("secret internal detail: /etc/omnigate/tls/tls.key")
        yield  # pragma: no cover - makes this an async generator

    def public_model_info(self, call):
        raise KeyError("secret internal detail")


async def test_unexpected_errors_are_internal_with_a_generic_message():
    settings = GatewaySettings(port=0, reflection=False)
    health_servicer = health.aio.HealthServicer()
    server, port = build_server(GatewayServicer(FakeExplodingCore()), settings, health_servicer)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            calls = {
                "Generate": lambda: _drain(stub.Generate(_request(), timeout=10)),
                "GetModelInfo": lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10),
            }
            for rpc, make in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await make()
                assert error.value.code() == grpc.StatusCode.INTERNAL, rpc
                assert error.value.details() == status.INTERNAL_MESSAGE, rpc
                trailing = dict(error.value.trailing_metadata() or ())
                assert b"secret" not in trailing.get("grpc-status-details-bin", b""), rpc
    finally:
        await server.stop(None)


async def _drain(call) -> list:
    return [event async for event in call]
