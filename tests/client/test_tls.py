"""TLS options of the clients (root CA, client certificate, server name) against a FAKE gateway served over
mutual TLS with a throwaway CA (control flow: what matters is the handshake)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from omnigate_client import AsyncOmnigateClient, OmnigateClient, OmnigateClientError, TLSConfig
from tests.support.fake_gateway import FakeGateway, FakeGatewayServer

from .pki import make_pki

HELLO = [{"role": "user", "content": "hi"}]
OMNIGATE = str(Path(sys.executable).parent / "omnigate")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mtls_server(pki):
    credentials = grpc.ssl_server_credentials(
        [(pki["server.key"].read_bytes(), pki["server.crt"].read_bytes())],
        root_certificates=pki["ca.crt"].read_bytes(),
        require_client_auth=True,
    )
    with FakeGatewayServer(FakeGateway(), server_credentials=credentials) as server:
        yield server


def test_mutual_tls_with_files_and_bytes(mtls_server, pki):
    with OmnigateClient(
        mtls_server.target,
        root_certificates=str(pki["ca.crt"]),
        certificate_chain=str(pki["client.crt"]),
        private_key=pki["client.key"].read_bytes(),
    ) as client:
        assert client.generate_all(HELLO).text == "Hello world"
    # The name to verify can differ from the address dialled.
    config = TLSConfig(pki["ca.crt"], pki["client.crt"], pki["client.key"], server_name="gateway.test")
    with OmnigateClient(mtls_server.target, tls=config) as client:
        assert client.health() == "SERVING"


def test_without_client_certificate_the_handshake_fails(mtls_server, pki):
    with OmnigateClient(mtls_server.target, root_certificates=str(pki["ca.crt"]), retries=0) as client:
        with pytest.raises(OmnigateClientError) as err:
            client.generate_all(HELLO, timeout_s=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_wrong_server_name_is_refused(mtls_server, pki):
    config = TLSConfig(pki["ca.crt"], pki["client.crt"], pki["client.key"], server_name="other.test")
    with OmnigateClient(mtls_server.target, tls=config, retries=0) as client:
        with pytest.raises(OmnigateClientError) as err:
            client.generate_all(HELLO, timeout_s=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_half_a_client_certificate_is_a_usage_error(pki):
    with pytest.raises(ValueError, match="both"):
        OmnigateClient("127.0.0.1:1", certificate_chain=str(pki["client.crt"]))


async def test_async_client_over_mutual_tls(mtls_server, pki):
    async with AsyncOmnigateClient(
        mtls_server.target,
        root_certificates=str(pki["ca.crt"]),
        certificate_chain=str(pki["client.crt"]),
        private_key=str(pki["client.key"]),
    ) as client:
        assert (await client.generate_all(HELLO)).text == "Hello world"


def test_cli_over_mutual_tls_with_api_key_from_env(mtls_server, pki):
    out = subprocess.run(
        [
            OMNIGATE,
            "--gateway",
            mtls_server.target,
            "--ca-cert",
            str(pki["ca.crt"]),
            "--client-cert",
            str(pki["client.crt"]),
            "--client-key",
            str(pki["client.key"]),
            "generate",
            "--text",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OMNIGATE_API_KEY": "env-key", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Hello world"
    assert mtls_server.fake.calls[-1].metadata["authorization"] == "Bearer env-key"
