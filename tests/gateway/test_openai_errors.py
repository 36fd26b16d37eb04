"""Where an error becomes an HTTP code (openai_api.errors): OpenAI's status and error body for every error."""

from __future__ import annotations

import pytest

from omnigate.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    LimitExceeded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from omnigate_gateway.openai_api.errors import NotFound, http_error, validation_error


def test_json_and_body_errors():
    assert (
        validation_error(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", 3),
                    "msg": "JSON decode error",
                    "ctx": {"error": "Expecting value"},
                }
            ]
        ).message
        == "the request body is not valid JSON (Expecting value)"
    )
    assert (
        "Content-Type: application/json"
        in validation_error([{"type": "missing", "loc": ("body",)}], json_body=False).message
    )
    assert (
        "missing"
        in validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required"}]).message
    )


@pytest.mark.parametrize(
    ("exc", "status", "type_", "code"),
    [
        (InvalidInput("bad"), 400, "invalid_request_error", "invalid_argument"),
        (Unauthenticated("who"), 401, "authentication_error", "invalid_api_key"),
        (PermissionDenied("no"), 403, "permission_error", "permission_denied"),
        (NotFound("gone"), 404, "invalid_request_error", "model_not_found"),
        (LimitExceeded("too big"), 413, "invalid_request_error", "request_too_large"),
        (LimitExceeded("busy", retry_after_s=0.25), 429, "rate_limit_error", "rate_limit_exceeded"),
        (Unavailable("later"), 503, "service_unavailable_error", "service_unavailable"),
        (DeadlineExceeded("slow"), 504, "timeout_error", "deadline_exceeded"),
        (InternalError("secret detail"), 500, "server_error", "internal_error"),
        (KeyError("secret detail"), 500, "server_error", "internal_error"),
    ],
)
def test_errors_map_to_openai_status_and_body(exc, status, type_, code):
    error = http_error(exc)
    assert error.status == status
    assert set(error.body) == {"error"} and set(error.body["error"]) == {"message", "type", "param", "code"}
    assert (error.body["error"]["type"], error.body["error"]["code"]) == (type_, code)
    if status == 500:
        assert "secret" not in error.body["error"]["message"]
    else:
        assert error.body["error"]["message"] == str(exc)
    if status == 429:
        assert error.headers == {"Retry-After": "1", "retry-after-ms": "250"}
    else:
        assert "Retry-After" not in error.headers
