"""The gateway's OpenAI-compatible HTTP API (FastAPI, served by uvicorn on the gateway's event loop).

A second front door onto ``GatewayCore``, next to gRPC: each request becomes a public ``GenerateRequest``
plus a ``Call`` (``openai_convert`` does the translation), and the core's events go back as OpenAI JSON or
server-sent events. Routes:

- ``POST /v1/chat/completions`` (streamed as SSE with ``stream: true``), text or speech output;
- ``POST /v1/images/generations`` for image-output models;
- ``GET /v1/models``, ``GET /v1/models/{id}``;
- ``GET /health``: 200 while the gateway is SERVING (its gRPC health), 503 otherwise.

Credentials: ``Authorization: Bearer <key>`` (or ``x-api-key``) becomes ``Call.api_key``. With the gateway's
TLS certificate configured the API is HTTPS only (``ReloadingTlsContext``). Deadline: the ``X-Request-Timeout``
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
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from grpc_health.v1 import health_pb2
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnigate import tls
from omnigate.errors import InternalError, OmnigateError
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway import openai_convert as oc
from omnigate_gateway.auth import credential
from omnigate_gateway.core import Call, GatewayCore, request_id_from
from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout"
SDK_TIMEOUT_HEADER = "x-stainless-read-timeout"  # what the openai SDK sends: its read timeout, in seconds
# Headers that are not call metadata (the credential travels as Call.api_key).
GENERATE_PATHS = ("/v1/chat/completions", "/v1/images/generations")  # the rest maps onto GetModelInfo
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

    def count_refusal(path: str, code: str) -> None:
        """A Generate request refused here, before the core (which counts everything it sees)."""
        if path in GENERATE_PATHS:
            core.metrics.requests.labels("Generate", code, "unknown").inc()

    def error_response(request: Request, exc: BaseException) -> JSONResponse:
        error = oc.http_error(exc)
        if (error.status >= 500 and not isinstance(exc, OmnigateError)) or isinstance(exc, InternalError):
            log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error.body, status_code=error.status, headers=error.headers)

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
        if exc.status_code == 413:
            count_refusal(request.url.path, "RESOURCE_EXHAUSTED")
            body = body_too_large(settings.max_http_body_bytes)
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

    return RequestIdMiddleware(app, settings.max_http_body_bytes, count_refusal)


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
    on every response, errors included; refuses a declared Content-Length over the body limit with an
    OpenAI-shaped 413 before anything is read (a body without one is counted as it arrives, by FastAPI's
    ``max_body_size``)."""

    def __init__(self, app: FastAPI, max_body_bytes: int, count_refusal: Callable[[str, str], None]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.count_refusal = count_refusal

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
        request_id = request_id_from(request_id)  # one rule for every front door
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        if declared is not None and declared > self.max_body_bytes:
            self.count_refusal(scope.get("path", ""), "RESOURCE_EXHAUSTED")
            response = JSONResponse(body_too_large(self.max_body_bytes), status_code=413)
            await response(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)


def body_too_large(limit: int) -> dict:
    return oc.error_body(
        f"the request body is larger than {limit} bytes (OMNIGATE_GATEWAY_MAX_HTTP_BODY_BYTES); send large "
        "media by URL",
        "invalid_request_error",
        "request_too_large",
    )


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
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
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
