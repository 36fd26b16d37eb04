"""The ``omnigate`` CLI's connection options (--api-key / $OMNIGATE_API_KEY, --timeout, --retries) against a
FAKE gateway (control flow), and its output against the real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.support.fake_gateway import FakeGateway, FakeGatewayServer, Step

OMNIGATE = str(Path(sys.executable).parent / "omnigate")


def _run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGATE_")}
    return subprocess.run(
        [OMNIGATE, *args], capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})}
    )


def test_api_key_flag_wins_over_env_and_retries_flag_is_used():
    steps = [Step(code=grpc.StatusCode.UNAVAILABLE, texts=())] * 2
    with FakeGatewayServer(FakeGateway(steps=list(steps))) as server:
        out = _run(
            "generate",
            "--gateway",
            server.target,
            "--api-key",
            "flag-key",
            "--retries",
            "2",
            "--text",
            "hi",
            "--summary",
            env={"OMNIGATE_API_KEY": "env-key"},
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Hello world"
    assert [c.metadata["authorization"] for c in server.fake.calls] == ["Bearer flag-key"] * 3
    summary = json.loads(out.stderr.strip().splitlines()[-1])
    assert summary["attempts"] == 3 and summary["request_id"] == "fake-request-1"


def test_no_retries_and_error_report():
    step = Step(code=grpc.StatusCode.RESOURCE_EXHAUSTED, message="queue is full", retry_after_s=2.5, texts=())
    with FakeGatewayServer(FakeGateway(steps=[step])) as server:
        out = _run("--retries", "0", "--gateway", server.target, "generate", "--text", "hi")
    assert out.returncode == 1
    assert "RESOURCE_EXHAUSTED: queue is full (retry after 2.5 s) [request id fake-request-1]" in out.stderr
    assert len(server.fake.calls) == 1


def test_timeout_flag_is_the_deadline():
    with FakeGatewayServer(FakeGateway(steps=[Step(delay_before_s=20)])) as server:
        started = time.monotonic()
        out = _run("generate", "--gateway", server.target, "--timeout", "0.5", "--text", "hi")
    assert out.returncode == 1 and "DEADLINE_EXCEEDED" in out.stderr
    assert time.monotonic() - started < 15
    # gRPC rounds the wire timeout up a little (0.5005 s seen in CI); 30 s would be the default.
    assert 0 < server.fake.calls[0].deadline_s <= 0.55


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(("--retries", "-1"), "--retries"), (("--timeout", "0"), "--timeout")],
)
def test_bad_connection_options_are_usage_errors(args, fragment):
    out = _run(*args, "generate", "--gateway", "127.0.0.1:1", "--text", "hi")
    assert out.returncode == 2 and fragment in out.stderr


@pytest.mark.slow
def test_cli_summary_from_the_real_stack(sdk_stack):
    out = _run(
        "generate",
        "--gateway",
        sdk_stack.gateway.target,
        "--text",
        "Hello",
        "--max-new-tokens",
        "4",
        "--summary",
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stderr.strip().splitlines()[-1])
    assert 1 <= summary["output_tokens"] <= 4 and summary["prompt_tokens"] > 0
    assert summary["finish_reason"] in {"stop", "length"}
    assert summary["timings"]["total_s"] > 0 and summary["attempts"] == 1
    models = json.loads(_run("models", "--gateway", sdk_stack.gateway.target).stdout)
    assert models["output_audio_sample_rate"] == 24000 and "Chelsie" in models["speakers"]
