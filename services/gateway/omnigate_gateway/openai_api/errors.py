"""Where an error becomes an HTTP code: OpenAI's error body and status for every error, and the app's
exception handlers.

``http_error`` maps the transport-neutral errors (``omnigate.errors``) once: a bad parameter is 400 (naming
it, OpenAI's ``error.param``), an unknown model 404, a missing or wrong key 401, a forbidden URL 403, a body
or media over a limit 413, a rate limit 429 with ``Retry-After``, no ready worker 503, a passed deadline
504, and anything else a generic 500 (the details go to the log, not to the caller).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from omnigate.errors import (
    QUOTE_LIMIT,
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    LimitExceeded,
    OmnigateError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    quote,
)
from omnigate_gateway.openai_api.refusals import count_refusal

log = logging.getLogger(__name__)


class InvalidParam(InvalidInput):
    """A 400 that names the offending request parameter (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.error_code = code


class NotFound(InvalidInput):
    """404: an unknown model or route (OpenAI answers ``model_not_found`` with 404)."""

    def __init__(self, message: str, code: str = "model_not_found", param: str | None = None) -> None:
        super().__init__(message)
        self.error_code = code
        self.param = param


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


INTERNAL_MESSAGE = "internal error; the request was logged"

# OmnigateError kind -> (HTTP status, OpenAI error type, error code)
_HTTP_ERRORS: dict[type[OmnigateError], tuple[int, str, str]] = {
    Unauthenticated: (401, "authentication_error", "invalid_api_key"),
    PermissionDenied: (403, "permission_error", "permission_denied"),
    Unavailable: (503, "service_unavailable_error", "service_unavailable"),
    DeadlineExceeded: (504, "timeout_error", "deadline_exceeded"),
}


@dataclass
class HttpError:
    """An error as OpenAI sends it: HTTP status, ``{"error": {...}}`` body and extra headers."""

    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def http_error(exc: BaseException) -> HttpError:
    """Maps an exception to OpenAI's error shape; anything but an OmnigateError is a generic 500."""
    if isinstance(exc, NotFound):
        return HttpError(404, error_body(exc.message, "invalid_request_error", exc.error_code, exc.param))
    if isinstance(exc, InvalidParam):
        return HttpError(400, error_body(exc.message, "invalid_request_error", exc.error_code, exc.param))
    if isinstance(exc, InvalidInput):
        return HttpError(400, error_body(exc.message, "invalid_request_error", "invalid_argument"))
    if isinstance(exc, LimitExceeded):
        if exc.retry_after_s is not None:
            headers = {
                "Retry-After": str(max(1, math.ceil(exc.retry_after_s))),
                "retry-after-ms": str(max(1, round(exc.retry_after_s * 1000))),
            }
            return HttpError(429, error_body(exc.message, "rate_limit_error", "rate_limit_exceeded"), headers)
        return HttpError(413, error_body(exc.message, "invalid_request_error", "request_too_large"))
    for kind, (status, type_, code) in _HTTP_ERRORS.items():
        if isinstance(exc, kind):
            retry_after = exc.retry_after_s if isinstance(exc, Unavailable) else None
            headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else {}
            return HttpError(status, error_body(exc.message, type_, code), headers)
    return HttpError(500, error_body(INTERNAL_MESSAGE, "server_error", "internal_error"))


def body_too_large(limit: int) -> dict:
    return error_body(
        f"the request body is larger than {limit} bytes (OMNIGATE_GATEWAY_MAX_HTTP_BODY_BYTES); send large "
        "media by URL",
        "invalid_request_error",
        "request_too_large",
    )


def validation_error(errors: list[dict], *, json_body: bool = True) -> InvalidParam:
    """A pydantic/FastAPI validation error list as one clear 400 naming the parameter."""
    if not json_body:
        return InvalidParam(
            "send the request body as a JSON object with Content-Type: application/json", None, "invalid_json"
        )
    if not errors:
        return InvalidParam("the request body is invalid", None)
    # The most specific error (a union reports one error per member; the deepest one is the useful one).
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = list(error.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    kind = error.get("type", "")
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return InvalidParam(f"the request body is not valid JSON ({detail})", None, "invalid_json")
    param = cut(_param_name(loc))  # a parameter name is user input too: an unknown key can be any size
    message = cut(str(error.get("msg", "invalid value")), 200)  # pydantic's may repeat a tag that was sent
    if not param:
        if kind == "missing":
            return InvalidParam("the request body is missing; send a JSON object", None, "invalid_json")
        return InvalidParam(f"the request body is invalid: {message}", None)
    if kind == "extra_forbidden":
        return InvalidParam(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    return InvalidParam(f"{param}: {message}", param)


def cut(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as a message shows it: at most ``limit`` characters, then how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def number_shown(value: int | float) -> str:
    """A number as a message shows it (a client may send a 10,000-digit integer: str() refuses those)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return cut(repr(value), 32)


_UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "ImageURL", "AudioFormat"}


def _param_name(loc: list) -> str:
    """("messages", 0, "content", "list[...]", 1, "image_url", "image_url", "url") -> messages[0].content[1].image_url.url"""
    out = ""
    previous = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = str(part)
            # pydantic names union members and discriminator tags in locations: they are not parameters.
            if "[" in name or name in _UNION_MEMBER_NAMES or name.startswith("function-") or name == previous:
                continue
            out += f".{name}" if out else name
            previous = name
    return out


def _unparsable(cause: BaseException) -> str:
    """Why Python's JSON parser gave up on a body (its own errors are JSONDecodeError, answered elsewhere)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not UTF-8: byte {cause.start} is {cause.object[cause.start : cause.start + 1]!r}"
    if isinstance(cause, RecursionError):
        return "it is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "a number has more than 4300 digits"
    return type(cause).__name__


def _count_refusal(request: Request, code: str) -> None:
    count_refusal(request.app.state.core.metrics, request.url.path, code)


def error_response(request: Request, exc: BaseException) -> JSONResponse:
    error = http_error(exc)
    if (error.status >= 500 and not isinstance(exc, OmnigateError)) or isinstance(exc, InternalError):
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
    return refusal(request, error.body, error.status, error.headers)


def refusal(request: Request, body: dict, status: int, headers: dict | None = None) -> JSONResponse:
    """An error answer; its reason goes to the access line RequestIdMiddleware writes."""
    request.state.refusal = body["error"]
    return JSONResponse(body, status_code=status, headers=headers)


async def _omnigate_error(request: Request, exc: OmnigateError) -> Response:
    if isinstance(exc, InvalidParam | NotFound):  # raised by the HTTP API, not the core
        _count_refusal(request, "NOT_FOUND" if isinstance(exc, NotFound) else "INVALID_ARGUMENT")
    return error_response(request, exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    json_body = request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
    _count_refusal(request, "INVALID_ARGUMENT")
    return error_response(request, validation_error(list(exc.errors()), json_body=json_body))


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    path = quote(request.url.path)
    if exc.status_code == 413:
        _count_refusal(request, "RESOURCE_EXHAUSTED")
        body = body_too_large(request.app.state.settings.max_http_body_bytes)
    elif exc.status_code == 404:
        body = error_body(f"Unknown route {request.method} {path}", "invalid_request_error", "not_found")
    elif exc.status_code == 405:
        body = error_body(
            f"{request.method} is not allowed on {path}; use {exc.headers.get('Allow') if exc.headers else 'another method'}",
            "invalid_request_error",
            "method_not_allowed",
        )
    elif exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
        _count_refusal(request, "INVALID_ARGUMENT")
        body = error_body(
            f"the request body is not valid JSON ({_unparsable(exc.__cause__)})",
            "invalid_request_error",
            "invalid_json",
        )
    else:
        body = error_body(str(exc.detail), "invalid_request_error", None)
    return refusal(request, body, exc.status_code, getattr(exc, "headers", None))


async def _client_gone(request: Request, exc: Exception) -> Response:
    log.info(
        "the client of request %s went away before its answer; generation stopped",
        request.state.request_id,
    )
    return Response(status_code=499)  # nobody reads it (nginx's "client closed request")


async def _unexpected(request: Request, exc: Exception) -> Response:
    return error_response(request, exc)


# What the app answers each error with (FastAPI's ``exception_handlers``; ``Exception`` is the last resort).
EXCEPTION_HANDLERS: dict[int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    OmnigateError: _omnigate_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
    ClientGone: _client_gone,
    ClientDisconnect: _client_gone,
    Exception: _unexpected,
}
