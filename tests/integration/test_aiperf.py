"""NVIDIA's AIPerf benchmark client against the real gateway and worker (bench/aiperf.py, small and bounded).

AIPerf 0.13.0 runs from its own virtual environment (.tools/aiperf-venv); the session fixture creates it
when it is missing (`make aiperf-tools` does the same ahead of time), so the test never skips. A streamed
run with ``ignore_eos`` and ``--use-server-token-count`` (and, for chat, ``--per-chunk-usage``: vLLM's
``continuous_usage_stats``) must end with zero errors, every request exactly the output length asked for,
and AIPerf's per-request token counts equal to the gateway's and the worker's own (their access lines,
matched by the X-Request-ID AIPerf sends).
"""

from __future__ import annotations

import pytest

from bench import aiperf as bench_aiperf
from tests.support.stack import MODELS_DIR

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first run installs AIPerf (minutes)


REQUESTS = 16
OUTPUT_TOKENS = 12


@pytest.fixture(scope="session")
def aiperf():
    return bench_aiperf.ensure_aiperf()


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_aiperf_streamed_run_has_no_errors_and_the_servers_token_counts(
    omni_stack, aiperf, tmp_path, endpoint
):
    run = bench_aiperf.run_aiperf(
        aiperf,
        f"http://127.0.0.1:{omni_stack.gateway.http_port}",
        MODELS_DIR / "tiny-qwen2.5-omni",
        tmp_path,
        requests=REQUESTS,
        concurrency=4,
        input_tokens=32,
        output_tokens=OUTPUT_TOKENS,
        endpoint=endpoint,
        metrics_urls=tuple(
            f"http://127.0.0.1:{service.metrics_port}/metrics"
            for service in (omni_stack.gateway, omni_stack.worker)
        ),
        timeout_s=600,
    )
    assert bench_aiperf.check(run, REQUESTS, OUTPUT_TOKENS, omni_stack) == [], run.console[-3000:]
    assert run.errors == 0 and len(run.records) == REQUESTS
    assert run.metric("request_count") == REQUESTS
    assert (
        run.metric("output_sequence_length", "min")
        == run.metric("output_sequence_length", "max")
        == OUTPUT_TOKENS
    )
    assert run.metric("time_to_first_token", "p50") > 0
    if endpoint == "chat":
        assert run.metric("inter_token_latency", "p50") > 0
