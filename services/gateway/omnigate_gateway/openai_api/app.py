"""The gateway's OpenAI-compatible HTTP API (FastAPI, served by uvicorn on the gateway's event loop).

A second front door onto ``GatewayCore``, next to gRPC: each request becomes a public ``GenerateRequest``
plus a ``Call`` (``openai_convert`` does the translation), and the core's events go back as OpenAI JSON or
server-sent events. Routes:

- ``POST /v1/chat/completions`` (streamed as SSE with ``stream: true``), text or speech output;
- ``POST /v1/completions``: text prompts (one user message on the same core; see ``openai_convert``);
- ``POST /v1/images/generations`` for image-output models;
- ``GET /v1/models``, ``GET /v1/models/{id}``;
- ``GET /health``: 200 while the gateway is SERVING (its gRPC health), 503 otherwise.

Every GET route answers HEAD (same status and headers, no body); a method a route does not take is 405
with an ``Allow`` header.

Credentials: ``Authorization: Bearer <key>`` (or ``x-api-key``) becomes ``Call.api_key``. With the gateway's
TLS certificate configured the API is HTTPS only (``ReloadingTlsContext``). Deadline: the ``X-Request-Timeout``
header (seconds); without it, a non-streamed request takes the openai SDK's own timeout
(``X-Stainless-Read-Timeout``, which for a non-streamed call bounds the whole answer), else the gateway's
default. A timeout that is not a finite positive number is refused (400); one above the gateway's default
timeout is cut to it (the default is also the longest wait an HTTP caller can ask for). Every response
carries ``X-Request-ID`` (the client's, when it sent a sane one).

Access lines: a request that reaches the core gets the core's access line (``observation._log_access``); a
request refused before it (bad JSON or parameters, unknown route or method, body too large, a malformed
HTTP request) gets one from ``RequestIdMiddleware`` (or the HTTP protocol guard), on the same logger, with
the request id, the HTTP status and the reason. uvicorn's own access log is off: it would log every URL
with its query string (where a client may put a credential).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import http
import json
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from grpc_health.v1 import health_pb2
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from omnigate import tls, tracing
from omnigate.errors import InternalError, OmnigateError, quote
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate.validation import RequestLimits
from omnigate_gateway.auth import credential
from omnigate_gateway.core import Call, GatewayCore, request_id_from
from omnigate_gateway.observation import access_log
from omnigate_gateway.openai_api import convert as oc
from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout"
SDK_TIMEOUT_HEADER = "x-stainless-read-timeout"  # what the openai SDK sends: its read timeout, in seconds
# Headers that are not call metadata (the credential travels as Call.api_key).
GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/images/generations")  # else GetModelInfo
_NOT_METADATA = {"authorization", "x-api-key", "cookie", "content-length", "content-type", "host"}

HealthProbe = Callable[[], Awaitable[bool]]


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def grpc_health_probe(health_servicer) -> HealthProbe:
    """/health follows the gateway's gRPC health (SERVING only while a worker is ready and not draining)."""

    async def probe() -> bool:
        reply = await health_servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
        return reply is not None and reply.status == health_pb2.HealthCheckResponse.SERVING

    return probe


def create_app(core: GatewayCore, settings: GatewaySettings, health: HealthProbe) -> RequestIdMiddleware:
    """The ASGI application: FastAPI routes wrapped in the X-Request-ID middleware."""
    app = FastAPI(
        title="Omnigate OpenAI-compatible API",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        max_body_size=settings.max_http_body_bytes,
    )
    started = int(time.time())

    def call_for(request: Request, rpc: str, *, streamed: bool) -> Call:
        headers = request.headers
        call = Call(
            rpc=rpc,
            request_id=request.state.request_id,
            time_remaining_s=_timeout(headers, streamed, settings.default_timeout_s),
            api_key=credential(headers.get("authorization"), headers.get("x-api-key")),
            metadata={k: v for k, v in headers.items() if k not in _NOT_METADATA},
            protocol="http",
        )
        request.state.reached_core = True  # from here on, the core logs the request's access line
        return call

    def served_model(requested: str | None, param: str = "model"):
        """The worker's model info (None while no worker is ready: the core then answers 503)."""
        info = core.worker.info
        if info is not None and not oc.model_matches(requested, info.model_id):
            raise oc.NotFound(
                f"The model {quote(requested)} does not exist or you do not have access to it; GET /v1/models "
                "lists the model this gateway serves",
                param=param,
            )
        return info

    # ---- errors in OpenAI's shape -----------------------------------------------------------------

    def count_refusal(path: str, code: str) -> None:
        """A Generate request refused here, before the core (which counts everything it sees)."""
        if path in GENERATE_PATHS:
            core.metrics.requests.labels("Generate", code, "unknown").inc()

    def error_response(request: Request, exc: BaseException) -> JSONResponse:
        error = oc.http_error(exc)
        if (error.status >= 500 and not isinstance(exc, OmnigateError)) or isinstance(exc, InternalError):
            log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        return refusal(request, error.body, error.status, error.headers)

    def refusal(request: Request, body: dict, status: int, headers: dict | None = None) -> JSONResponse:
        """An error answer; its reason goes to the access line RequestIdMiddleware writes."""
        request.state.refusal = body["error"]
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(OmnigateError)
    async def _omnigate_error(request: Request, exc: OmnigateError):
        if isinstance(exc, oc.InvalidParam | oc.NotFound):  # raised by this module, not the core
            count_refusal(
                request.url.path, "NOT_FOUND" if isinstance(exc, oc.NotFound) else "INVALID_ARGUMENT"
            )
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        json_body = (
            request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
        )
        count_refusal(request.url.path, "INVALID_ARGUMENT")
        return error_response(request, oc.validation_error(list(exc.errors()), json_body=json_body))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        path = quote(request.url.path)
        if exc.status_code == 413:
            count_refusal(request.url.path, "RESOURCE_EXHAUSTED")
            body = body_too_large(settings.max_http_body_bytes)
        elif exc.status_code == 404:
            body = oc.error_body(
                f"Unknown route {request.method} {path}", "invalid_request_error", "not_found"
            )
        elif exc.status_code == 405:
            body = oc.error_body(
                f"{request.method} is not allowed on {path}; use {exc.headers.get('Allow') if exc.headers else 'another method'}",
                "invalid_request_error",
                "method_not_allowed",
            )
        elif exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            count_refusal(request.url.path, "INVALID_ARGUMENT")
            body = oc.error_body(
                f"the request body is not valid JSON ({_unparsable(exc.__cause__)})",
                "invalid_request_error",
                "invalid_json",
            )
        else:
            body = oc.error_body(str(exc.detail), "invalid_request_error", None)
        return refusal(request, body, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: Exception):
        log.info(
            "the client of request %s went away before its answer; generation stopped",
            request.state.request_id,
        )
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(request, exc)

    # ---- routes -----------------------------------------------------------------------------------
    # GET routes take HEAD too: uvicorn sends the same status and headers without the body.

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def get_health():
        if await health():
            return {"status": "SERVING"}
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def list_models(request: Request):
        info = core.public_model_info(call_for(request, "GetModelInfo", streamed=False))
        return {"object": "list", "data": [oc.model_object(info.model_id, started)]}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def get_model(model: str, request: Request):
        served_model(model)  # an unknown model is refused here (and logged as such), not after the core
        info = core.public_model_info(call_for(request, "GetModelInfo", streamed=False))
        if not oc.model_matches(model, info.model_id):
            raise oc.NotFound(
                f"The model {quote(model)} does not exist or you do not have access to it", param="model"
            )
        return oc.model_object(info.model_id, started)

    chat_body = oc.bounded_chat_request(RequestLimits(settings.max_messages, settings.max_content_parts))

    async def complete(request: Request, body, info, proto, options, prefix: str, answer, stream_class):
        """Runs a chat or text completion through the core: one JSON answer, or server-sent events."""
        call = call_for(request, "Generate", streamed=options.stream)
        model = info.model_id if info is not None else (body.model or "")
        completion_id = f"{prefix}-{call.request_id}"
        created = int(time.time())
        events = core.generate(proto, call)
        if not options.stream:
            collected, _ = await _until_disconnect(request, _collect(events))
            return answer(completion_id, created, model, options, collected)
        return await _event_stream(request, events, stream_class(completion_id, created, model, options))

    async def chat_completions(body, request: Request):
        info = served_model(body.model)
        proto, options = oc.chat_request(body, info.max_new_tokens if info is not None else None)
        if info is not None and options.voice:
            proto.speaker = oc.pick_voice(options.voice, info.speakers)
        return await complete(
            request, body, info, proto, options, "chatcmpl", oc.chat_completion, oc.ChatStream
        )

    chat_completions.__annotations__["body"] = chat_body  # a class built here: not a name FastAPI can look up
    app.post("/v1/chat/completions")(chat_completions)

    @app.post("/v1/completions")
    async def completions(body: oc.CompletionRequest, request: Request):
        info = served_model(body.model)
        proto, options = oc.completion_request(body, info.max_new_tokens if info is not None else None)
        return await complete(
            request, body, info, proto, options, "cmpl", oc.text_completion, oc.CompletionStream
        )

    @app.post("/v1/images/generations")
    async def images_generations(body: oc.ImageGenerationRequest, request: Request):
        proto, output_format, size = oc.image_request(body)
        served_model(body.model)
        call = call_for(request, "Generate", streamed=False)
        collected, _ = await _until_disconnect(request, _collect(core.generate(proto, call)))
        images = [e.image for e in collected if e.WhichOneof("event") == "image"]
        if not images:
            raise InternalError("the model returned no image")
        data, width, height = await asyncio.to_thread(oc.image_result, images[0], output_format, size)
        return {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(data).decode(), "revised_prompt": None}],
            "output_format": output_format,
            "size": f"{width}x{height}",
        }

    return RequestIdMiddleware(app, settings.max_http_body_bytes, count_refusal)


def _timeout(headers, streamed: bool, maximum_s: float) -> float | None:
    """The caller's deadline in seconds (None: the gateway's default), at most ``maximum_s``."""
    raw = headers.get(TIMEOUT_HEADER)
    name = "X-Request-Timeout"
    if raw is None and not streamed:
        raw, name = headers.get(SDK_TIMEOUT_HEADER), "X-Stainless-Read-Timeout"
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise oc.InvalidParam(
            f"{name} is {quote(raw)}; it must be a number of seconds greater than 0 (at most {maximum_s:g} "
            "is used)",
            name,
        )
    # A huge value (1e308) would overflow the deadline arithmetic into an immediate timeout.
    return min(value, maximum_s)


def _unparsable(cause: BaseException) -> str:
    """Why Python's JSON parser gave up on a body (its own errors are JSONDecodeError, answered elsewhere)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not UTF-8: byte {cause.start} is {cause.object[cause.start : cause.start + 1]!r}"
    if isinstance(cause, RecursionError):
        return "it is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "a number has more than 4300 digits"
    return type(cause).__name__


async def _collect(events: AsyncIterator[gw.GenerateResponse]) -> list[gw.GenerateResponse]:
    return [event async for event in events]


async def _until_disconnect(request: Request, awaitable) -> tuple:
    """Awaits ``awaitable`` unless the client hangs up first (then it is cancelled: generation stops).

    Returns its result and the context it ran in: the core binds the request's id and trace span there,
    and a stream that goes on in another task (the SSE response's) carries them on from it."""
    context = contextvars.copy_context()
    task = asyncio.get_running_loop().create_task(awaitable, context=context)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone()
    return task.result(), context


async def _event_stream(request: Request, events, stream) -> EventSourceResponse:
    """A streamed answer. The first event is awaited before answering, so that errors before any output
    (bad media, no worker, auth, limits) get their HTTP status; later errors can only be an SSE error
    event."""
    iterator = aiter(events)
    first, context = await _until_disconnect(request, anext(iterator, None))
    trace_context = context.run(tracing.current_context)
    return EventSourceResponse(
        _sse(stream, first, iterator, request.state.request_id, trace_context),
        sep="\n",
        ping=15,
        send_timeout=60,
    )


async def _sse(
    stream, first: gw.GenerateResponse | None, events, request_id: str, trace_context
) -> AsyncIterator[dict]:
    def data(chunk: dict) -> dict:
        return {"data": json.dumps(chunk, separators=(",", ":"))}

    # The SSE response iterates in a task of its own: the request's id and span are bound again here, so
    # the core's log lines (its access line at the end) carry them.
    with tracing.activate(request_id=request_id, context=trace_context):
        try:
            start = stream.start()
            for chunk in start if isinstance(start, list) else [start]:
                yield data(chunk)
            if first is not None:
                for chunk in stream.event(first):
                    yield data(chunk)
            try:
                async for event in events:
                    for chunk in stream.event(event):
                        yield data(chunk)
            except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes in the stream
                error = oc.http_error(exc)
                if error.status >= 500 and not isinstance(exc, OmnigateError):
                    log.error("internal error in a streamed completion %s", request_id, exc_info=exc)
                yield data(error.body)
            yield {"data": "[DONE]"}
        finally:
            await events.aclose()


# HTTP status -> the gRPC code name an access line shows for a refusal (the core's lines use these names).
_STATUS_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _rpc(path: str) -> str:
    if path in GENERATE_PATHS:
        return "Generate"
    if path == "/v1/models" or path.startswith("/v1/models/"):
        return "GetModelInfo"
    return "none"


def log_refusal(
    request_id: str, method: str, path: str, status: int, error: dict | None, duration_s: float
) -> None:
    """The access line of an HTTP request refused before it reached the core (same logger and fields as the
    core's, plus the HTTP status, method, path without its query string, the parameter and the reason)."""
    rpc, code = _rpc(path), _STATUS_CODES.get(status, "INTERNAL" if status >= 500 else "UNKNOWN")
    reason = (error or {}).get("message") or f"HTTP {status}"
    param = (error or {}).get("param")
    access_log.info(
        "%s %s http mode=unknown duration_s=%.3f output_tokens=0 status=%d %s %s param=%s reason=%s",
        rpc,
        code,
        duration_s,
        status,
        method,
        quote(path),
        param,
        reason,
        extra={
            "request_id": request_id,
            "rpc": rpc,
            "code": code,
            "protocol": "http",
            "mode": "unknown",
            "duration_s": round(duration_s, 6),
            "output_tokens": 0,
            "http_status": status,
            "method": method,
            "path": path if len(path) <= 256 else f"{path[:256]}...",
            "param": param,
            "reason": reason,
        },
    )


class RequestIdMiddleware:
    """Outermost ASGI layer: gives each request its id (the client's X-Request-ID when sane) and returns it
    on every response, errors included; refuses a declared Content-Length over the body limit with an
    OpenAI-shaped 413 before anything is read (a body without one is counted as it arrives, by FastAPI's
    ``max_body_size``); writes the access line of every request refused before it reached the core (the
    core writes the others); and keeps an exception that was already answered (Starlette re-raises it after
    the 500) from closing the client's keep-alive connection."""

    def __init__(self, app: FastAPI, max_body_bytes: int, count_refusal: Callable[[str, str], None]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.count_refusal = count_refusal

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = None
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
        state = scope.setdefault("state", {})
        # One rule for every front door; the HTTP protocol guard may have named the request already.
        request_id = state.get("request_id") or request_id_from(request_id)
        state["request_id"] = request_id
        status = 0
        complete = False

        async def send_with_id(message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            if declared is not None and declared > self.max_body_bytes:
                self.count_refusal(scope.get("path", ""), "RESOURCE_EXHAUSTED")
                body = body_too_large(self.max_body_bytes)
                state["refusal"] = body["error"]
                await JSONResponse(body, status_code=413)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            if not complete:
                raise
            # Answered already (the handler logged it): uvicorn would log it again and drop the connection.
        finally:
            if status >= 400 and not state.get("reached_core") and not state.get("logged"):
                path = scope.get("path", "")
                if not (path == "/health" and status == 503):  # the probe's answer, not a refusal
                    log_refusal(
                        request_id,
                        scope["method"],
                        path,
                        status,
                        state.get("refusal"),
                        time.monotonic() - started,
                    )


def body_too_large(limit: int) -> dict:
    return oc.error_body(
        f"the request body is larger than {limit} bytes (OMNIGATE_GATEWAY_MAX_HTTP_BODY_BYTES); send large "
        "media by URL",
        "invalid_request_error",
        "request_too_large",
    )


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 HTTP/1.1 protocol with two guards of ours around the request body.

    - A chunk-size line declaring more than the body limit is refused at once (413, connection closed).
      h11 takes any chunk size of up to 20 hex digits (2^80 - 1) and then waits for that many bytes; the
      application only ever sees the bytes that arrive, never the declared size, so a client declaring a
      2^64-byte chunk and sending nothing more held its request and connection open for ever.
    - A request h11 cannot parse (a chunk size of 21 hex digits or more, a malformed request line or
      header) gets uvicorn's 400 and closed connection, but with an OpenAI-shaped body, a request id and
      an access line (uvicorn's own answer is plain text and unlogged).

    The implementation is chosen explicitly (``uvicorn.Config(http=...)``) instead of uvicorn's "auto",
    which switches to httptools whenever that package happens to be installed: these guards, and the tests
    that prove them (tests/integration/test_http_hardening.py), are about h11. h11 keeps the size still due
    of the chunk being read in ``ChunkedReader._bytes_in_chunk``, a private attribute (checked with h11 0.16;
    test_an_absurd_declared_chunk_size_is_answered_and_the_connection_closed fails if it goes away).
    """

    max_body_bytes = 0  # set on the subclass HttpApiServer makes

    def handle_events(self) -> None:
        super().handle_events()
        declared = getattr(getattr(self.conn, "_reader", None), "_bytes_in_chunk", 0)
        cycle: RequestResponseCycle | None = self.cycle  # typed as set, it is None between requests
        if (
            isinstance(declared, int)
            and declared > self.max_body_bytes
            and cycle is not None
            and not cycle.response_started
            and not self.transport.is_closing()
        ):
            body = oc.error_body(
                f"a chunk of the request body declares {oc.number_shown(declared)} bytes; a request body may "
                f"have at most {self.max_body_bytes} bytes (OMNIGATE_GATEWAY_MAX_HTTP_BODY_BYTES)",
                "invalid_request_error",
                "request_too_large",
            )
            self._refuse(413, body)

    def send_400_response(self, msg: str) -> None:  # uvicorn calls it when h11 cannot parse the request
        body = oc.error_body(
            "the request is not valid HTTP/1.1 (a malformed request line, header, or chunk size of the body)",
            "invalid_request_error",
            "invalid_request",
        )
        self._refuse(400, body)

    def _refuse(self, status: int, body: dict) -> None:
        """Answers ``status`` with ``body``, logs the access line, and closes the connection."""
        started = time.monotonic()
        current: RequestResponseCycle | None = self.cycle  # typed as set, it is None between requests
        cycle = current if current is not None and not current.response_complete else None
        scope = cycle.scope if cycle is not None else None
        state = scope.setdefault("state", {}) if scope is not None else {}
        headers = scope.get("headers", ()) if scope is not None else ()
        sent_id = next((v.decode("latin-1") for k, v in headers if k == b"x-request-id"), None)
        request_id = state.get("request_id") or request_id_from(sent_id)
        state.update(request_id=request_id, logged=True)  # RequestIdMiddleware: same id, no second line
        payload = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
            (b"x-request-id", request_id.encode()),
        ]
        if cycle is None or not cycle.response_started:
            with contextlib.suppress(h11.LocalProtocolError):  # no answer fits h11's state: just close
                reason = http.HTTPStatus(status).phrase.encode()
                for event in (
                    h11.Response(status_code=status, headers=headers, reason=reason),
                    h11.Data(data=payload),
                    h11.EndOfMessage(),
                ):
                    self.transport.write(self.conn.send(event))
        if cycle is not None:  # the application, if it runs, sees a client that went away
            cycle.disconnected = True
            cycle.message_event.set()
        method, path = (scope["method"], scope["path"]) if scope is not None else ("-", "-")
        log_refusal(request_id, method, path, status, body["error"], time.monotonic() - started)
        self.transport.close()


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway owns SIGTERM/SIGINT and calls ``stop``."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class ReloadingTlsContext:
    """The HTTP API's TLS context, following the certificate, key and client CA files as they change.

    OpenSSL calls the context's server-name callback on every handshake (with or without SNI); the callback
    looks at the files at most once per ``check_interval_s`` and, when they changed and load, hands the
    handshake a context built from the new ones, as the gRPC port does (``omnigate.tls``). Files that do not
    load are logged and the previous certificate stays in use. With a client CA, clients must present a
    certificate it signed.
    """

    def __init__(
        self,
        cert_file: str | None,
        key_file: str | None,
        client_ca_file: str | None = None,
        *,
        check_interval_s: float = tls.CHECK_INTERVAL_S,
    ) -> None:
        if not (cert_file and key_file):
            raise tls.TlsConfigError("TLS needs both a certificate file and a key file")
        self._cert_file, self._key_file, self._client_ca_file = cert_file, key_file, client_ca_file
        self._paths = (cert_file, key_file, client_ca_file)
        self._check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._version = tls.files_version(self._paths)
        self._refused: tls.FileVersion | None = None
        self.context = self._build()  # fails start-up on unusable files
        self.context.sni_callback = self._select
        self._current = self.context
        self._next_check = time.monotonic() + check_interval_s
        self.reloads = 0

    def _build(self) -> ssl.SSLContext:
        tls.load_key_pair(self._cert_file, self._key_file)  # a clear error when they do not belong together
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self._cert_file, self._key_file)
        except (OSError, ssl.SSLError) as e:
            raise tls.TlsConfigError(f"cannot load {self._cert_file} and {self._key_file}: {e}") from None
        if self._client_ca_file:
            context.load_verify_locations(cadata=tls.load_ca(self._client_ca_file).decode())
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _select(self, connection, server_name, context) -> None:
        try:
            with self._lock:
                now = time.monotonic()
                if now >= self._next_check:
                    self._next_check = now + self._check_interval_s
                    version = tls.files_version(self._paths)
                    if version not in (self._version, self._refused):
                        try:
                            fresh = self._build()
                        except (tls.TlsConfigError, OSError, ssl.SSLError) as e:
                            self._refused = version
                            log.error(
                                "HTTP API TLS files changed but cannot be used (%s); keeping the previous certificate",
                                e,
                            )
                        else:
                            fresh.sni_callback = self._select
                            self._current, self._version = fresh, version
                            self.reloads += 1
                            log.info("HTTP API TLS certificate reloaded from %s", self._cert_file)
                current = self._current
            if connection.context is not current:
                connection.context = current
        except Exception:  # noqa: BLE001 - an exception here would fail the handshake
            log.exception("HTTP API TLS certificate check failed; keeping the previous certificate")
        return None


class HttpApiServer:
    """The HTTP API's socket and uvicorn server, run as a task on the gateway's event loop."""

    def __init__(self, app, settings: GatewaySettings) -> None:
        try:
            self._socket = _bind(settings.http_host, settings.http_port)
        except OSError as e:
            raise SystemExit(
                f"cannot listen for HTTP on {settings.http_host}:{settings.http_port} ({e}); set "
                "OMNIGATE_GATEWAY_HTTP_PORT to a free port (0 = OS-chosen, -1 = no HTTP API)"
            ) from None
        self.host = settings.http_host
        self.port = self._socket.getsockname()[1]
        protocol = type(
            "GuardedH11Protocol", (_GuardedH11Protocol,), {"max_body_bytes": settings.max_http_body_bytes}
        )
        config = uvicorn.Config(
            app,
            http=protocol,
            lifespan="off",
            log_config=None,
            access_log=False,  # it logs query strings; RequestIdMiddleware and the core write access lines
            ws="none",
            server_header=False,
            timeout_graceful_shutdown=max(1, math.ceil(settings.grace_period_s)),
        )
        config.load()
        # The public gRPC port's certificate serves the HTTP API too: with TLS configured, it is HTTPS only.
        self.tls = None
        if settings.tls_cert_file or settings.tls_key_file:
            self.tls = ReloadingTlsContext(
                settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
            )
            config.ssl = self.tls.context
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP API stopped during start-up")
            await asyncio.sleep(0.01)
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not self._server.should_exit:
            error = None if task.cancelled() else task.exception()
            log.error("the HTTP API stopped unexpectedly; gRPC goes on serving", exc_info=error)

    async def stop(self) -> None:
        """Stops accepting connections and lets in-flight responses finish (up to the grace period)."""
        self._server.should_exit = True
        if self._task is not None:
            try:
                await self._task
            except Exception:  # noqa: BLE001 - the rest of the gateway's shutdown must still run
                log.exception("the HTTP API failed while stopping")
