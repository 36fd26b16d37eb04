"""The SDK against a real gateway with TLS and API keys (a key limited to 1 request/s), in front of the SDK
tests' real worker: credentials over TLS, and a real RESOURCE_EXHAUSTED + RetryInfo that the SDK honours."""

from __future__ import annotations

import time

import grpc
import pytest

from omnigate_client import AsyncOmnigateClient, OmnigateClient, OmnigateClientError
from tests.integration.conftest import start_service

from .pki import make_pki

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-sdk-key-0001"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def keyed_gateway(sdk_stack, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("keyed-gateway")
    pki = make_pki(workdir)
    keys = workdir / "api-keys"
    keys.write_text(f"# name:secret[:rps=N][:burst=N]\nsdk-tests:{SECRET}:rps=1:burst=1\n")
    gateway = start_service(
        "gateway-keys",
        "omnigate_gateway.main",
        {
            "OMNIGATE_GATEWAY_WORKER_TARGET": sdk_stack.worker.target,
            "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.5",
            "OMNIGATE_GATEWAY_TLS_CERT_FILE": str(pki["server.crt"]),
            "OMNIGATE_GATEWAY_TLS_KEY_FILE": str(pki["server.key"]),
            "OMNIGATE_GATEWAY_HEALTH_PORT": "0",
            "OMNIGATE_GATEWAY_API_KEYS_FILE": str(keys),
            "OMNIGATE_GATEWAY_HTTP_PORT": "-1",
        },
        workdir,
    )
    try:
        deadline = time.monotonic() + 120
        while True:  # the main port speaks TLS only: check its health through the SDK
            try:
                with OmnigateClient(gateway.target, root_certificates=str(pki["ca.crt"])) as client:
                    if client.health() == "SERVING":
                        break
            except OmnigateClientError:
                pass
            if time.monotonic() > deadline or gateway.process.poll() is not None:
                raise RuntimeError(f"keyed gateway not SERVING:\n{gateway.log_tail()}")
            time.sleep(0.2)
        yield gateway, pki
    finally:
        gateway.stop()


def test_missing_or_wrong_key_is_unauthenticated_and_not_retried(keyed_gateway):
    gateway, pki = keyed_gateway
    for key in (None, "not-a-key"):
        with OmnigateClient(gateway.target, root_certificates=str(pki["ca.crt"]), api_key=key) as client:
            with pytest.raises(OmnigateClientError) as err:
                client.generate_all(HELLO, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and err.value.attempts == 1


def test_rate_limited_call_is_retried_after_the_servers_delay(keyed_gateway):
    gateway, pki = keyed_gateway
    with OmnigateClient(gateway.target, root_certificates=str(pki["ca.crt"]), api_key=SECRET) as client:
        time.sleep(1.1)  # a full bucket
        assert client.generate_all(HELLO, max_new_tokens=2).text
        with pytest.raises(OmnigateClientError) as err:  # the bucket is empty: refused, and told when
            client.generate_all(HELLO, max_new_tokens=2, retries=0)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0 < err.value.retry_after <= 1.0 and err.value.request_id
        time.sleep(1.1)
        assert client.generate_all(HELLO, max_new_tokens=2).text
        stream = client.generate(HELLO, max_new_tokens=2)  # refused once, then served after the delay
        started = time.monotonic()
        result = stream.collect()
    assert result.text and stream.attempts == 2
    assert time.monotonic() - started >= 0.5


async def test_async_client_with_key_over_tls(keyed_gateway):
    gateway, pki = keyed_gateway
    time.sleep(1.1)
    async with AsyncOmnigateClient(
        gateway.target, root_certificates=pki["ca.crt"].read_bytes(), api_key=SECRET
    ) as client:
        info = await client.model_info()
        result = await client.generate_all(HELLO, max_new_tokens=2)
    assert info.model_id.endswith("tiny-qwen2.5-omni") and result.text
