"""The gateway's Authenticator: API keys file, reload and revocation, per-key rate and concurrency limits."""

from __future__ import annotations

import contextlib

import pytest
from prometheus_client import CollectorRegistry

from omnigate import status
from omnigate.errors import LimitExceeded, Unauthenticated
from omnigate_gateway.auth import (
    BAD_KEY_MESSAGE,
    NO_KEY_MESSAGE,
    Authenticator,
    TokenBucket,
    credential,
    parse_keys,
)
from omnigate_gateway.core import Call
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.settings import GatewaySettings
from tests.support.certs import secret_volume


class FakeClock:
    """A fake of time.monotonic: a manual clock, so that rate limits and reload intervals are tested without
    sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _auth(tmp_path, text: str, **settings) -> tuple[Authenticator, GatewayMetrics, FakeClock]:
    secret_volume(tmp_path, {"api-keys": text.encode()})
    metrics = GatewayMetrics(CollectorRegistry())
    clock = FakeClock()
    s = GatewaySettings(api_keys_file=str(tmp_path / "api-keys"), api_keys_reload_interval_s=1.0, **settings)
    return Authenticator(s, metrics, clock=clock), metrics, clock


def _rejected(metrics: GatewayMetrics, reason: str) -> float:
    return (
        metrics.registry.get_sample_value("omnigate_gateway_rejected_requests_total", {"reason": reason})
        or 0.0
    )


def call(key: str | None) -> Call:
    return Call(rpc="Generate", api_key=key)


@pytest.mark.parametrize(
    "authorization,x_api_key,expected",
    [
        ("Bearer abc", None, "abc"),
        ("bearer   abc  ", None, "abc"),
        ("Basic dXNlcjpwYXNz", None, None),
        ("Bearer ", None, None),
        (None, "xyz", "xyz"),
        ("Basic dXNlcjpwYXNz", "xyz", "xyz"),
        ("Bearer abc", "xyz", "abc"),
        (None, None, None),
    ],
)
def test_credential_from_headers(authorization, x_api_key, expected):
    assert credential(authorization, x_api_key) == expected


def test_keys_file_format_and_refused_lines():
    text = """
    # comment
    alice:s3cret-alice
    bob:s3cret-bob:rps=2.5:burst=3:concurrency=1

    bad line without secret
    carol::rps=1
    dave:s3cret-dave:speed=9
    erin:s3cret-erin:burst=0
    alice:another-secret
    frank:s3cret-alice
    na me:s3cret-x
    """
    keys, problems = parse_keys(text, "keys")
    by_name = {k.name: k for k in keys.values()}
    assert set(by_name) == {"alice", "bob"}
    assert (by_name["bob"].requests_per_s, by_name["bob"].burst, by_name["bob"].max_concurrent) == (2.5, 3, 1)
    assert by_name["alice"].requests_per_s is None
    assert len(problems) == 7
    assert all(problem.startswith("keys line ") for problem in problems)
    joined = "\n".join(problems)
    assert "speed=9" in joined and "burst must be >= 1" in joined and "used by an earlier line" in joined
    for secret in ("s3cret", "another-secret"):  # problems never show a secret
        assert secret not in joined


def test_no_key_wrong_key_and_valid_key(tmp_path):
    auth, metrics, _ = _auth(tmp_path, "alice:s3cret-alice\n")
    assert auth.authenticate(call("s3cret-alice")) == "alice"
    for key, message in (
        (None, NO_KEY_MESSAGE),
        ("wrong", BAD_KEY_MESSAGE),
        ("s3cret-alic", BAD_KEY_MESSAGE),
    ):
        with pytest.raises(Unauthenticated) as error:
            auth.authenticate(call(key))
        assert error.value.message == message
        assert status.to_status(error.value).code.name == "UNAUTHENTICATED"
    assert _rejected(metrics, "unauthenticated") == 3


def test_missing_key_message_speaks_the_callers_protocol(tmp_path):
    auth, _, _ = _auth(tmp_path, "alice:s3cret-alice\n")
    with pytest.raises(Unauthenticated) as grpc_error:
        auth.authenticate(Call(rpc="Generate", protocol="grpc"))
    with pytest.raises(Unauthenticated) as http_error:
        auth.authenticate(Call(rpc="Generate", protocol="http"))
    assert "metadata 'authorization: Bearer <key>'" in grpc_error.value.message
    assert "header 'Authorization: Bearer <key>'" in http_error.value.message
    assert "metadata" not in http_error.value.message


def test_no_keys_file_admits_everyone():
    auth = Authenticator(GatewaySettings(), GatewayMetrics(CollectorRegistry()))
    assert not auth.enabled
    assert auth.authenticate(call(None)) is None


def test_missing_keys_file_fails_start_up(tmp_path):
    with pytest.raises(ValueError, match="cannot read the API keys file"):
        Authenticator(GatewaySettings(api_keys_file=str(tmp_path / "nope")))


def test_removed_key_is_refused_after_the_reload_interval(tmp_path):
    auth, _, clock = _auth(tmp_path, "alice:s3cret-alice\ndave:s3cret-dave\n")
    assert auth.authenticate(call("s3cret-dave")) == "dave"
    secret_volume(tmp_path, {"api-keys": b"alice:s3cret-alice\nerin:s3cret-erin\n"})
    # Within the interval the file is not looked at again...
    assert auth.authenticate(call("s3cret-dave")) == "dave"
    clock.now += 1.5
    with pytest.raises(Unauthenticated, match="not valid"):
        auth.authenticate(call("s3cret-dave"))
    assert auth.authenticate(call("s3cret-erin")) == "erin"
    assert auth.authenticate(call("s3cret-alice")) == "alice"


def test_a_vanished_file_keeps_the_loaded_keys(tmp_path):
    auth, _, clock = _auth(tmp_path, "alice:s3cret-alice\n")
    (tmp_path / "api-keys").unlink()
    clock.now += 5
    assert auth.authenticate(call("s3cret-alice")) == "alice"


def test_token_bucket():
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(10.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # capped at burst


async def _admit(auth: Authenticator, key: str) -> None:
    async with auth.admit(call(key)):
        pass


async def test_rate_limit_is_per_key_with_retry_info(tmp_path):
    auth, metrics, clock = _auth(
        tmp_path,
        "alice:s3cret-alice\nbob:s3cret-bob:rps=1:burst=2\n",
        api_key_requests_per_s=100.0,
        api_key_burst=100,
    )
    await _admit(auth, "s3cret-bob")
    await _admit(auth, "s3cret-bob")
    with pytest.raises(LimitExceeded) as error:
        await _admit(auth, "s3cret-bob")
    assert error.value.retry_after_s == pytest.approx(1.0)
    assert "'bob'" in error.value.message and "rate limit of 1 " in error.value.message
    assert status.to_status(error.value).code.name == "RESOURCE_EXHAUSTED"
    assert _rejected(metrics, "rate_limited") == 1
    for _ in range(20):  # alice is not affected (her own default bucket of 100)
        await _admit(auth, "s3cret-alice")
    clock.now += 1.0
    await _admit(auth, "s3cret-bob")


async def test_default_rate_limit_applies_to_keys_without_override(tmp_path):
    auth, _, clock = _auth(tmp_path, "alice:s3cret-alice\n", api_key_requests_per_s=0.5, api_key_burst=1)
    await _admit(auth, "s3cret-alice")
    with pytest.raises(LimitExceeded) as error:
        await _admit(auth, "s3cret-alice")
    assert error.value.retry_after_s == pytest.approx(2.0)
    clock.now += 2.0
    await _admit(auth, "s3cret-alice")


async def test_concurrency_limit_holds_slots_until_the_stream_ends(tmp_path):
    auth, metrics, _ = _auth(
        tmp_path, "alice:s3cret-alice:concurrency=2\nbob:s3cret-bob\n", api_key_max_concurrent=1
    )
    async with contextlib.AsyncExitStack() as stack:
        assert await stack.enter_async_context(auth.admit(call("s3cret-alice"))) == "alice"
        await stack.enter_async_context(auth.admit(call("s3cret-alice")))
        with pytest.raises(LimitExceeded, match="already has 2 Generate stream") as error:
            await _admit(auth, "s3cret-alice")
        assert error.value.retry_after_s and error.value.retry_after_s > 0
        async with auth.admit(call("s3cret-bob")):  # bob's default limit is 1 and his own
            with pytest.raises(LimitExceeded):
                await _admit(auth, "s3cret-bob")
    assert _rejected(metrics, "concurrency_limited") == 2
    # The slots are free again, also after a stream that failed.
    with pytest.raises(RuntimeError):
        async with auth.admit(call("s3cret-bob")):
            raise RuntimeError("the stream failed")
    await _admit(auth, "s3cret-bob")
    await _admit(auth, "s3cret-alice")


async def test_a_reloaded_override_applies_to_new_requests(tmp_path):
    auth, _, clock = _auth(tmp_path, "bob:s3cret-bob:rps=1:burst=1\n")
    await _admit(auth, "s3cret-bob")
    with pytest.raises(LimitExceeded):
        await _admit(auth, "s3cret-bob")
    secret_volume(tmp_path, {"api-keys": b"bob:s3cret-bob:rps=1:burst=5\n"})
    clock.now += 1.0  # one token earned, and the bigger bucket from now on
    await _admit(auth, "s3cret-bob")
    with pytest.raises(LimitExceeded):
        await _admit(auth, "s3cret-bob")
    clock.now += 10.0
    for _ in range(5):
        await _admit(auth, "s3cret-bob")


class FakeServicerContext:
    """A fake of grpc's ServicerContext: only what the gRPC front door reads to build a Call."""

    def invocation_metadata(self):
        return (("authorization", "Bearer key-one"), ("x-api-key", "key-two"), ("traceparent", "00-ab-cd-01"))

    def time_remaining(self):
        return None


def test_grpc_front_door_takes_the_key_out_of_the_call_metadata():
    from omnigate_gateway.grpc_api.server import GatewayServicer

    built = GatewayServicer._call("Generate", FakeServicerContext())
    assert built.api_key == "key-one"
    assert "authorization" not in built.metadata and "x-api-key" not in built.metadata
    assert built.metadata["traceparent"] == "00-ab-cd-01"
