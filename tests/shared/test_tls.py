"""omnigate.tls: TLS and mutual TLS on real sockets (in-process gRPC servers), certificate reload, bad files."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from omnigate import tls
from omnigate.grpc_server import finish_server, start_health_server
from tests.support.certs import Authority, secret_volume

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki():
    ca = Authority("test CA")
    rogue = Authority("rogue CA")
    return {
        "ca": ca,
        "server": ca.issue("server", dns=("localhost",), ips=("127.0.0.1",)),
        "client": ca.issue("gateway", client=True),
        "rogue_client": rogue.issue("intruder", client=True),
    }


def _server_files(directory: Path, pki, server=None) -> dict[str, str]:
    """The server's files as a Kubernetes Secret volume (tls.crt, tls.key, ca.crt behind ..data)."""
    server = server or pki["server"]
    secret_volume(
        directory, {"tls.crt": server.cert_pem, "tls.key": server.key_pem, "ca.crt": pki["ca"].cert_pem}
    )
    return {name: str(directory / name) for name in ("tls.crt", "tls.key", "ca.crt")}


async def _serve(credentials) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    servicer = health.aio.HealthServicer()
    await servicer.set("", SERVING)
    server = grpc.aio.server()
    port = finish_server(
        server,
        "test.Service",
        servicer,
        enable_reflection=False,
        host="127.0.0.1",
        port=0,
        credentials=credentials,
    )
    await server.start()
    return server, port, servicer


async def _check(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


def _client(pki, issued=None) -> grpc.ChannelCredentials:
    issued = issued or pki["client"]
    return grpc.ssl_channel_credentials(pki["ca"].cert_pem, issued.key_pem, issued.cert_pem)


def _peer_certificate(port: int, pki) -> x509.Certificate:
    """The certificate the server presents on a new connection (a real TLS handshake with a client cert)."""
    context = ssl.create_default_context(cadata=pki["ca"].cert_pem.decode())
    context.set_alpn_protocols(["h2"])
    cert_path = Path(pki["tmp"]) / "client.crt"
    key_path = Path(pki["tmp"]) / "client.key"
    context.load_cert_chain(cert_path, key_path)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))


async def test_mutual_tls_accepts_the_right_client_and_refuses_others(tmp_path, pki):
    files = _server_files(tmp_path / "tls", pki)
    credentials = tls.server_credentials(files["tls.crt"], files["tls.key"], files["ca.crt"])
    server, port, _ = await _serve(credentials)
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.secure_channel(target, _client(pki)) as channel:
            assert await _check(channel) == SERVING
        refused = {
            "plaintext": grpc.aio.insecure_channel(target),
            "no client certificate": grpc.aio.secure_channel(
                target, grpc.ssl_channel_credentials(pki["ca"].cert_pem)
            ),
            "certificate of another CA": grpc.aio.secure_channel(target, _client(pki, pki["rogue_client"])),
        }
        for why, channel in refused.items():
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await _check(channel)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE, why
    finally:
        await server.stop(None)


async def test_tls_without_client_ca_accepts_any_client_over_tls_only(tmp_path, pki):
    files = _server_files(tmp_path / "tls", pki)
    server, port, _ = await _serve(tls.server_credentials(files["tls.crt"], files["tls.key"]))
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(pki["ca"].cert_pem)
        ) as channel:
            assert await _check(channel) == SERVING
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await _check(channel)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_new_connections_get_the_renewed_certificate_and_bad_files_keep_the_old_one(
    tmp_path, pki, caplog
):
    pki = {**pki, "tmp": tmp_path}
    pki["client"].write(tmp_path, "client")
    files = _server_files(tmp_path / "tls", pki)
    certificates = tls.ReloadingServerCertificates(
        files["tls.crt"], files["tls.key"], files["ca.crt"], check_interval_s=0.1
    )
    server, port, _ = await _serve(certificates.credentials())
    try:
        first = await asyncio.to_thread(_peer_certificate, port, pki)
        assert first == pki["server"].certificate

        renewed = pki["ca"].issue("server", dns=("localhost",), ips=("127.0.0.1",))
        _server_files(tmp_path / "tls", pki, renewed)  # the kubelet's symlink swap
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(_peer_certificate, port, pki) != renewed.certificate:
            assert time.monotonic() < deadline, "new connections kept the old certificate"
            await asyncio.sleep(0.05)
        assert certificates.reloads == 1

        # A key that does not match the certificate (e.g. a half-finished manual update): refused, logged,
        # and the renewed certificate stays in use.
        other = pki["ca"].issue("server", dns=("localhost",))
        secret_volume(
            tmp_path / "tls",
            {"tls.crt": other.cert_pem, "tls.key": renewed.key_pem, "ca.crt": pki["ca"].cert_pem},
        )
        deadline = time.monotonic() + 10
        with caplog.at_level(logging.ERROR, logger="omnigate.tls"):
            # every connection keeps the renewed certificate, until (and after) the bad files are noticed
            while "does not match" not in caplog.text:
                assert await asyncio.to_thread(_peer_certificate, port, pki) == renewed.certificate
                assert time.monotonic() < deadline, "the mismatched key was never noticed"
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(_peer_certificate, port, pki) == renewed.certificate
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", _client(pki)) as channel:
            assert await _check(channel) == SERVING
    finally:
        await server.stop(None)


async def test_plaintext_health_port_serves_health_only(tmp_path, pki):
    servicer = health.aio.HealthServicer()
    await servicer.set("", SERVING)
    server, port = await start_health_server(servicer, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await _check(channel) == SERVING
            await servicer.enter_graceful_shutdown()
            assert await _check(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            # Nothing else is served there (here: reflection).
            call = channel.unary_unary("/grpc.reflection.v1alpha.ServerReflection/Anything")
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call(b"", timeout=5)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
    assert await start_health_server(servicer, "127.0.0.1", -1) == (None, None)


def test_unusable_configurations_fail_with_a_clear_error(tmp_path, pki):
    cert, key = pki["server"].write(tmp_path, "server")
    other_cert, _ = pki["client"].write(tmp_path, "client")
    assert tls.server_credentials(None, None) is None
    cases = {
        "both a certificate file and a key file": lambda: tls.server_credentials(str(cert), None),
        "no server certificate": lambda: tls.server_credentials(None, None, str(cert)),
        "does not match": lambda: tls.load_key_pair(str(other_cert), str(key)),
        "cannot read the certificate file": lambda: tls.load_key_pair(
            str(tmp_path / "missing.crt"), str(key)
        ),
        "holds no PEM certificate": lambda: tls.load_ca(str(key)),
        "holds no unencrypted PEM key": lambda: tls.load_key_pair(str(cert), str(cert)),
        "needs both": lambda: tls.channel_credentials(None, str(cert), None),
    }
    for message, make in cases.items():
        with pytest.raises(tls.TlsConfigError, match=message):
            make()
    (tmp_path / "empty.pem").write_bytes(b"\n")
    with pytest.raises(tls.TlsConfigError, match="is empty"):
        tls.load_ca(str(tmp_path / "empty.pem"))


def test_files_version_follows_a_secret_volume_update(tmp_path, pki):
    secret_volume(tmp_path, {"ca.crt": pki["ca"].cert_pem})
    path = str(tmp_path / "ca.crt")
    before = tls.files_version((path, None))
    assert before == tls.files_version((path, None)) and before[0] is not None and before[1] is None
    time.sleep(0.01)
    secret_volume(tmp_path, {"ca.crt": pki["ca"].cert_pem})  # same bytes, new file behind the symlink
    assert tls.files_version((path, None)) != before
    assert tls.files_version((str(tmp_path / "gone.crt"),)) == (None,)
