"""The gateway's OpenAI-compatible HTTP API (FastAPI, served by uvicorn on the gateway's event loop).

A second front door onto ``GatewayCore``, next to gRPC: each request becomes a public ``GenerateRequest``
plus a ``Call`` (``openai_convert`` does the translation), and the core's events go back as OpenAI JSON or
server-sent events. Routes:

- ``POST /v1/chat/completions`` (streamed as SSE with ``stream: true``), text or speech output;
- ``POST /v1/images/generations`` for image-output models;
- ``GET /v1/models``, ``GET /v1/models/{id}``;
- ``GET /health``: 200 while the gateway is SERVING (its gRPC health), 503 otherwise.

Credentials: ``Authorization: Bearer <key>`` becomes ``Call.api_key``. Deadline: the ``X-Request-Timeout``
header (seconds); without it, a non-streamed request takes the openai SDK's own timeout
(``X-Stainless-Read-Timeout``, which for a non-streamed call bounds the whole answer), else the gateway's
default. Every response carries ``X-Request-ID`` (the client's, when it sent a sane one).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from grpc_health.v1 import health_pb2
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnigate.errors import InternalError, OmnigateError
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway import openai_convert as oc
from omnigate_gateway.auth import credential
from omnigate_gateway.core import Call, GatewayCore, new_request_id
from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
TIMEOUT_HEADER = "x-request-timeout"
SDK_TIMEOUT_HEADER = "x-stainless-read-timeout"  # what the openai SDK sends: its read timeout, in seconds
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Headers that are not call metadata (the credential travels as Call.api_key).
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
        return Call(
            rpc=rpc,
            request_id=request.state.request_id,
            time_remaining_s=_timeout(headers, streamed),
            api_key=credential(headers.get("authorization"), headers.get("x-api-key")),
            metadata={k: v for k, v in headers.items() if k not in _NOT_METADATA},
            protocol="http",
        )

    def served_model(requested: str | None, param: str = "model"):
        """The worker's model info (None while no worker is ready: the core then answers 503)."""
        info = core.worker.info
        if info is not None and not oc.model_matches(requested, info.model_id):
            raise oc.NotFound(
                f"The model `{requested}` does not exist or you do not have access to it; GET /v1/models "
                "lists the model this gateway serves",
                param=param,
            )
        return info

    # ---- errors in OpenAI's shape -----------------------------------------------------------------

    def error_response(request: Request, exc: BaseException) -> JSONResponse:
        error = oc.http_error(exc)
        if (error.status >= 500 and not isinstance(exc, OmnigateError)) or isinstance(exc, InternalError):
            log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error.body, status_code=error.status, headers=error.headers)

    @app.exception_handler(OmnigateError)
    async def _omnigate_error(request: Request, exc: OmnigateError):
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        json_body = (
            request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
        )
        return error_response(request, oc.validation_error(list(exc.errors()), json_body=json_body))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:
            message = (
                f"the request body is larger than {settings.max_http_body_bytes} bytes "
                "(OMNIGATE_GATEWAY_MAX_HTTP_BODY_BYTES); send large media by URL"
            )
            body = oc.error_body(message, "invalid_request_error", "request_too_large")
        elif exc.status_code == 404:
            body = oc.error_body(
                f"Unknown route {request.method} {request.url.path}", "invalid_request_error", "not_found"
            )
        elif exc.status_code == 405:
            body = oc.error_body(
                f"{request.method} is not allowed on {request.url.path}",
                "invalid_request_error",
                "method_not_allowed",
            )
        else:
            body = oc.error_body(str(exc.detail), "invalid_request_error", None)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        log.info(
            "the client of request %s went away before its answer; generation stopped",
            request.state.request_id,
        )
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(request, exc)

    # ---- routes -----------------------------------------------------------------------------------

    @app.get("/health")
    async def get_health():
        if await health():
            return {"status": "SERVING"}
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)

    @app.get("/v1/models")
    async def list_models(request: Request):
        info = core.public_model_info(call_for(request, "GetModelInfo", streamed=False))
        return {"object": "list", "data": [oc.model_object(info.model_id, started)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        info = core.public_model_info(call_for(request, "GetModelInfo", streamed=False))
        if not oc.model_matches(model, info.model_id):
            raise oc.NotFound(
                f"The model `{model}` does not exist or you do not have access to it", param="model"
            )
        return oc.model_object(info.model_id, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oc.ChatCompletionRequest, request: Request):
        call = call_for(request, "Generate", streamed=bool(body.stream))
        proto, options = oc.chat_request(body)
        info = served_model(body.model)
        if info is not None and options.voice:
            proto.speaker = oc.pick_voice(options.voice, info.speakers)
        model = info.model_id if info is not None else (body.model or "")
        completion_id = f"chatcmpl-{call.request_id}"
        created = int(time.time())
        events = core.generate(proto, call)
        if not options.stream:
            collected = await _until_disconnect(request, _collect(events))
            return oc.chat_completion(completion_id, created, model, options, collected)
        # The first event is awaited before answering, so that errors before any output (bad media, no
        # worker, auth, limits) get their HTTP status; later errors can only be an SSE error event.
        iterator = aiter(events)
        first = await _until_disconnect(request, anext(iterator, None))
        stream = oc.ChatStream(completion_id, created, model, options)
        return EventSourceResponse(
            _sse(stream, first, iterator, call.request_id), sep="\n", ping=15, send_timeout=60
        )

    @app.post("/v1/images/generations")
    async def images_generations(body: oc.ImageGenerationRequest, request: Request):
        call = call_for(request, "Generate", streamed=False)
        proto, output_format, size = oc.image_request(body)
        served_model(body.model)
        collected = await _until_disconnect(request, _collect(core.generate(proto, call)))
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

    return RequestIdMiddleware(app)


def _timeout(headers, streamed: bool) -> float | None:
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
        raise oc.InvalidParam(f"the {name} header must be a positive number of seconds; got {raw!r}", None)
    return value


async def _collect(events: AsyncIterator[gw.GenerateResponse]) -> list[gw.GenerateResponse]:
    return [event async for event in events]


async def _until_disconnect(request: Request, awaitable):
    """Awaits ``awaitable`` unless the client hangs up first (then it is cancelled: generation stops)."""
    task = asyncio.ensure_future(awaitable)

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
    return task.result()


async def _sse(
    stream: oc.ChatStream, first: gw.GenerateResponse | None, events, request_id: str
) -> AsyncIterator[dict]:
    def data(chunk: dict) -> dict:
        return {"data": json.dumps(chunk, separators=(",", ":"))}

    try:
        yield data(stream.start())
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
                log.error("internal error in a streamed chat completion %s", request_id, exc_info=exc)
            yield data(error.body)
        yield {"data": "[DONE]"}
    finally:
        await events.aclose()


class RequestIdMiddleware:
    """Outermost ASGI layer: gives each request its id (the client's X-Request-ID when sane) and returns it
    on every response, errors included."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope.get("headers", ()):
            if name == REQUEST_ID_HEADER.encode():
                candidate = value.decode("latin-1")
                if _REQUEST_ID.match(candidate):
                    request_id = candidate
        request_id = request_id or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()
                ]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


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
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            ws="none",
            server_header=False,
            timeout_graceful_shutdown=max(1, math.ceil(settings.grace_period_s)),
        )
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP API stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stops accepting connections and lets in-flight responses finish (up to the grace period)."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
