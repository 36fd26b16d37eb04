"""Hostile and odd HTTP input against the real gateway (uvicorn on a loopback port) and both services'
metrics ports: every one gets a clear answer (4xx naming what was wrong), never a 500, a hang or an
immediate timeout, and every refusal leaves an access line with its request id and reason.

HEAD is checked with ``http.client`` (a real HTTP/1.1 client that knows a HEAD answer has no body: a body
sent anyway would corrupt the next answer on the same connection), the chunked-body attack over a raw
socket."""

from __future__ import annotations

import http.client as http_client
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def gateway(omni_stack):
    return omni_stack.gateway


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=60) as client:
        yield client


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert response.headers["x-request-id"]
    return body["error"]


# ---- HEAD ---------------------------------------------------------------------------------------------


def _exchange(port: int, requests: list[tuple[str, str]]) -> list[tuple[int, dict[str, str], bytes]]:
    """Sends ``requests`` one after the other on ONE keep-alive connection (http.client)."""
    connection = http_client.HTTPConnection("127.0.0.1", port, timeout=30)
    answers = []
    try:
        for method, path in requests:
            connection.request(method, path)
            response = connection.getresponse()
            body = response.read()
            answers.append((response.status, {k.lower(): v for k, v in response.getheaders()}, body))
    finally:
        connection.close()
    return answers


def test_head_is_get_without_a_body_on_every_get_route(gateway, http):
    model = http.get("/v1/models").json()["data"][0]["id"]
    for path in ("/health", "/v1/models", f"/v1/models/{model}", "/v1/models/no-such-model"):
        (get_status, get_headers, get_body), (head_status, head_headers, head_body), after = _exchange(
            gateway.http_port, [("GET", path), ("HEAD", path), ("GET", "/health")]
        )
        assert head_status == get_status, path
        assert head_body == b"", path
        for name in ("content-type", "content-length"):
            assert head_headers.get(name) == get_headers.get(name), (path, name)
        assert head_headers["x-request-id"]
        assert after[0] == 200 and json.loads(after[2]) == {"status": "SERVING"}, (
            "the connection is still in step after HEAD"
        )


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("HEAD", "/v1/chat/completions", "POST"),
        ("GET", "/v1/chat/completions", "POST"),
        ("HEAD", "/v1/completions", "POST"),
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/v1/models", "GET, HEAD"),
    ],
)
def test_a_method_a_route_does_not_take_is_405_with_allow(gateway, method, path, allow):
    (status, headers, body), after = _exchange(gateway.http_port, [(method, path), ("GET", "/health")])
    assert status == 405 and {m.strip() for m in headers["allow"].split(",")} == set(allow.split(", "))
    assert (body == b"") == (method == "HEAD")
    assert after[0] == 200


def test_head_on_an_unknown_route_is_404_without_a_body(gateway):
    (status, _, body), after = _exchange(gateway.http_port, [("HEAD", "/v1/nothing"), ("GET", "/health")])
    assert status == 404 and body == b"" and after[0] == 200


@pytest.mark.parametrize("service", ["gateway", "worker"])
def test_metrics_ports_answer_head(omni_stack, service):
    port = getattr(omni_stack, service).metrics_port
    (
        (get_status, get_headers, get_body),
        (head_status, head_headers, head_body),
        (post_status, post_headers, _),
    ) = _exchange(port, [("GET", "/metrics"), ("HEAD", "/metrics"), ("POST", "/metrics")])
    assert get_status == 200 and b"# TYPE" in get_body
    assert head_status == 200 and head_body == b""
    assert head_headers["content-type"] == get_headers["content-type"]
    assert int(head_headers["content-length"]) > 0
    assert post_status == 405 and {m.strip() for m in post_headers["allow"].split(",")} >= {"GET", "HEAD"}
    assert httpx.head(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200


# ---- numbers outside their domain ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "value", "allowed"),
    [
        ("max_tokens", 2**70, "an integer between 1 and"),
        ("max_tokens", 0, "an integer between 1 and"),
        ("max_completion_tokens", 2**64, "an integer between 1 and"),
        ("top_k", 2**40, "-1 or 0 (no cut-off) or an integer between 1 and 2147483647"),
        ("top_k", -5, "-1 or 0 (no cut-off)"),
        ("min_tokens", 2**33, "an integer between 0 and"),
        ("min_tokens", -1, "an integer between 0 and"),
        ("seed", 2**70, "an integer between -9223372036854775808 and 18446744073709551615"),
        ("seed", -(2**64), "an integer between -9223372036854775808"),
        ("n", 2**70, "it must be 1"),
    ],
)
def test_integers_beyond_their_field_are_400(http, param, value, allowed):
    body = {"messages": HI, "max_tokens": 4, param: value}
    error = _error(http.post("/v1/chat/completions", json=body))
    assert error["param"] == param, error
    assert error["message"].startswith(f"{param} is ") and allowed in error["message"], error


def test_min_tokens_above_max_tokens_is_400(http):
    error = _error(http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 4, "min_tokens": 9}))
    assert error["param"] == "min_tokens" and "max_tokens (4)" in error["message"]


@pytest.mark.parametrize(
    ("param", "raw", "allowed"),
    [
        ("temperature", "NaN", "0 (greedy) or between 1e-05 and 2"),
        ("temperature", "Infinity", "0 (greedy) or between 1e-05 and 2"),
        ("temperature", "-0.5", "0 (greedy) or between 1e-05 and 2"),
        ("temperature", "5e-324", "0 (greedy) or between 1e-05 and 2"),
        ("temperature", "2.5", "0 (greedy) or between 1e-05 and 2"),
        ("top_p", "NaN", "greater than 0 and at most 1"),
        ("top_p", "0", "greater than 0 and at most 1"),
        ("top_p", "1e-300", "greater than 0 and at most 1"),
        ("top_p", "1.5", "greater than 0 and at most 1"),
        ("repetition_penalty", "NaN", "between 0.01 and 100"),
        ("repetition_penalty", "0", "between 0.01 and 100"),
        ("repetition_penalty", "-1", "between 0.01 and 100"),
        ("repetition_penalty", "-Infinity", "between 0.01 and 100"),
        ("presence_penalty", "NaN", "it must be 0"),
        ("frequency_penalty", "Infinity", "it must be 0"),
    ],
)
def test_floats_outside_their_domain_are_400(http, param, raw, allowed):
    # Python's JSON parser takes NaN and Infinity: they reach the server as floats.
    body = f'{{"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 4, "{param}": {raw}}}'
    error = _error(http.post("/v1/chat/completions", content=body, headers=JSON))
    assert error["param"] == param, error
    assert error["message"].startswith(f"{param} is ") and allowed in error["message"], error


def test_video_fps_outside_its_domain_is_400(http):
    body = '{"messages": [{"role": "user", "content": "Hi"}], "mm_processor_kwargs": {"fps": Infinity}}'
    error = _error(http.post("/v1/chat/completions", content=body, headers=JSON))
    assert error["param"] == "mm_processor_kwargs.fps" and "greater than 0" in error["message"]


def test_edge_values_inside_the_domain_are_answered(http):
    # (1e-5 itself arrives as float32 9.99999975e-06, which the core's own check refuses: left to the core.)
    for extra in ({"temperature": 2e-5}, {"temperature": 2}, {"top_p": 1e-30}, {"repetition_penalty": 100}):
        response = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, **extra})
        assert response.status_code == 200, (extra, response.text)


# ---- text that is not Unicode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "Hi \\ud800"}]}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff!"}]}]}',
            "messages[0].content[0].text",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "Hi"}], "stop": ["\\ud83d"]}',
            "stop[0]",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "Hi"}], "user": "\\ud800"}',
            "user",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "Hi"}], "model": "m\\ud800"}',
            "model",
        ),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "\\ud800": 1}', None),
        ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
        ("/v1/images/generations", '{"prompt": "a \\ud800 square"}', "prompt"),
    ],
)
def test_a_lone_surrogate_is_400_naming_the_field(http, path, raw, param):
    error = _error(http.post(path, content=raw, headers=JSON))
    assert error["param"] == param and "unpaired UTF-16 surrogate" in error["message"], error


# ---- X-Request-Timeout ----------------------------------------------------------------------------------


def test_a_huge_timeout_is_capped_not_an_immediate_timeout(http):
    for value in ("1e308", "99999999999"):
        response = http.post(
            "/v1/chat/completions",
            json={"messages": HI, "max_tokens": 2},
            headers={"X-Request-Timeout": value},
        )
        assert response.status_code == 200, (value, response.text)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1", "soon", "1e999"])
def test_a_timeout_that_is_not_a_positive_number_is_400(http, value):
    error = _error(
        http.post(
            "/v1/chat/completions",
            json={"messages": HI, "max_tokens": 2},
            headers={"X-Request-Timeout": value},
        )
    )
    assert error["message"].startswith(f"X-Request-Timeout is '{value}'; it must be"), error
    assert error["param"] == "X-Request-Timeout"


# ---- a chunked body declaring an absurd chunk ---------------------------------------------------------------


@pytest.mark.parametrize("size", [2**80, 2**64, 2**40], ids=["2^80", "2^64", "2^40"])
def test_an_absurd_declared_chunk_size_is_answered_and_the_connection_closed(gateway, size):
    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-ID: chunk-attack\r\nTransfer-Encoding: chunked\r\n\r\n"
            + format(size, "x").encode()
            + b'\r\n{"messages": '
        )
        received = b""
        while chunk := sock.recv(65536):  # until the server closes it (the 10 s timeout fails the test)
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status in (400, 413), received
    assert b"x-request-id: chunk-attack" in head.lower()
    assert b'"error"' in body and b"chunk" in body


# ---- access lines for every refusal ------------------------------------------------------------------------


def _access_lines(log_path: Path, request_id: str, wait_s: float = 15) -> list[dict]:
    deadline = time.monotonic() + wait_s
    while True:
        lines = []
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and request_id in line:
                record = json.loads(line)
                if record.get("request_id") == request_id and record["logger"] == "omnigate_gateway.access":
                    lines.append(record)
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("request_id", "method", "path", "kwargs", "status", "reason"),
    [
        (
            "refused-param",
            "POST",
            "/v1/chat/completions",
            {"json": {"messages": HI, "top_k": -9}},
            400,
            "top_k",
        ),
        (
            "refused-json",
            "POST",
            "/v1/chat/completions",
            {"content": b"{", "headers": JSON},
            400,
            "not valid JSON",
        ),
        (
            "refused-unknown",
            "POST",
            "/v1/chat/completions",
            {"json": {"messages": HI, "x": 1}},
            400,
            "Unrecognized",
        ),
        ("refused-route", "GET", "/v1/nothing?token=SECRET-QUERY", {}, 404, "Unknown route"),
        ("refused-method", "PUT", "/v1/models", {}, 405, "PUT is not allowed"),
        (
            "refused-timeout",
            "POST",
            "/v1/chat/completions",
            {"json": {"messages": HI}, "headers": {"X-Request-Timeout": "nan"}},
            400,
            "X-Request-Timeout",
        ),
        ("refused-model", "GET", "/v1/models/gpt-4o", {}, 404, "gpt-4o"),
        ("refused-completions", "POST", "/v1/completions", {"json": {"prompt": ["a", "b"]}}, 400, "prompt"),
    ],
)
def test_every_refusal_leaves_one_access_line_with_its_request_id_and_reason(
    gateway, http, request_id, method, path, kwargs, status, reason
):
    kwargs = dict(kwargs)
    headers = {**kwargs.pop("headers", {}), "X-Request-ID": request_id}
    response = http.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status and response.headers["x-request-id"] == request_id
    lines = _access_lines(gateway.log_path, request_id)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["protocol"] == "http" and line["http_status"] == status
    assert reason in line["reason"], line
    assert line["path"] == path.split("?")[0]
    assert line["code"] != "OK"


def test_a_refusal_by_the_core_is_logged_once(gateway, http):
    response = http.post(
        "/v1/chat/completions",
        json={"messages": HI, "modalities": ["text", "audio"], "audio": {"voice": "Nobody", "format": "wav"}},
        headers={"X-Request-ID": "refused-core"},
    )
    assert response.status_code == 400
    lines = _access_lines(gateway.log_path, "refused-core")
    assert len(lines) == 1 and lines[0]["code"] == "INVALID_ARGUMENT", lines
    assert "Nobody" in lines[0]["reason"], "the core's own refusals say why too"


def test_a_streamed_request_access_line_carries_its_request_id(gateway, http):
    trace_id = "5cf92f3577b34da6a3ce929d0e0e4736"
    headers = {"X-Request-ID": "streamed-1", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    body = {"messages": HI, "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        response.read()
    lines = _access_lines(gateway.log_path, "streamed-1")
    assert len(lines) == 1 and lines[0]["code"] == "OK" and lines[0]["output_tokens"] >= 1, lines
    assert lines[0]["trace_id"] == trace_id, "the request's trace context too"


def test_no_query_string_or_credential_reaches_the_log(gateway, http):
    http.get(
        "/v1/models?api_key=SECRET-QUERY-2",
        headers={"Authorization": "Bearer SECRET-KEY-2", "X-Request-ID": "secret-query-2"},
    )
    http.get("/v1/nothing?api_key=SECRET-QUERY-3", headers={"X-Request-ID": "secret-query-3"})
    http.post(
        "/v1/chat/completions?key=SECRET-QUERY-4",
        json={"messages": HI, "max_tokens": 1},
        headers={"X-Request-ID": "secret-query-4"},
    )
    # the three requests are logged (their access lines written) before the log is read
    for request_id in ("secret-query-2", "secret-query-3", "secret-query-4"):
        assert _access_lines(gateway.log_path, request_id), f"no access line for {request_id}"
    log = gateway.log_path.read_text(errors="replace")
    for secret in ("SECRET-QUERY", "SECRET-KEY"):
        assert secret not in log


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
        (b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"messages": [{"role": "user", "content": "Hi \xff"}]}', "not UTF-8"),
    ],
    ids=["huge-number", "deep", "latin-1"],
)
def test_a_body_json_cannot_parse_is_400_saying_why(http, raw, words):
    error = _error(http.post("/v1/chat/completions", content=raw, headers=JSON))
    assert error["code"] == "invalid_json" and words in error["message"], error


def test_a_body_of_100k_messages_is_refused_by_count(gateway, http):
    """Refused before its messages are validated one by one (which held the event loop for a second)."""
    body = {"messages": [{"role": "user", "content": "a"}] * 100_000, "max_tokens": 2}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code in (400, 413), response.text
    assert "100000 messages; the limit is 1024" in response.json()["error"]["message"]
    parts = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 5000}],
        "max_tokens": 2,
    }
    response = http.post("/v1/chat/completions", json=parts)
    assert "5000 content parts; the limit is 4096" in response.json()["error"]["message"]
