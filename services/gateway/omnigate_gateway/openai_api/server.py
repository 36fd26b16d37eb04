"""The HTTP API's server: its socket, uvicorn on the gateway's event loop, h11 with guards around the
request body, and TLS that follows the certificate files (``omnigate.tls.ReloadingFiles``, as the gRPC port
does)."""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from omnigate import tls
from omnigate_gateway.core import request_id_from
from omnigate_gateway.openai_api.errors import error_body, number_shown
from omnigate_gateway.openai_api.refusals import log_refusal
from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


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
            body = error_body(
                f"a chunk of the request body declares {number_shown(declared)} bytes; a request body may "
                f"have at most {self.max_body_bytes} bytes (OMNIGATE_GATEWAY_MAX_HTTP_BODY_BYTES)",
                "invalid_request_error",
                "request_too_large",
            )
            self._refuse(413, body)

    def send_400_response(self, msg: str) -> None:  # uvicorn calls it when h11 cannot parse the request
        body = error_body(
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
    def capture_signals(self) -> Iterator[None]:
        yield


class ReloadingTlsContext:
    """The HTTP API's TLS context, following the certificate, key and client CA files as they change.

    OpenSSL calls the context's server-name callback on every handshake (with or without SNI); the callback
    asks ``omnigate.tls.ReloadingFiles`` (the gRPC port's reloader: the files looked at at most once per
    ``check_interval_s``) for a context built from new files and, when there is one, hands the handshake
    that context. Files that do not load are logged and the previous certificate stays in use. With a client
    CA, clients must present a certificate it signed.
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
        self._lock = threading.Lock()
        self._files = tls.ReloadingFiles(
            (cert_file, key_file, client_ca_file),
            self._build,  # fails start-up on unusable files
            label="HTTP API TLS",
            check_interval_s=check_interval_s,
            unusable=(tls.TlsConfigError, OSError, ssl.SSLError),
        )
        self.context = self._files.initial
        self._current = self.context

    @property
    def reloads(self) -> int:
        """Contexts built from changed files since start (tests, logs)."""
        return self._files.reloads

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
        context.sni_callback = self._select
        return context

    def _select(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        try:
            with self._lock:
                fresh = self._files.changed()
                if fresh is not None:
                    self._current = fresh
                current = self._current
            if connection.context is not current:
                connection.context = current
        except Exception:  # noqa: BLE001 - an exception here would fail the handshake
            log.exception("HTTP API TLS certificate check failed; keeping the previous certificate")
        return None


class HttpApiServer:
    """The HTTP API's socket and uvicorn server, run as a task on the gateway's event loop."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
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
            # /v1/realtime; a message may be as large as a request body
            ws="websockets-sansio",
            ws_max_size=settings.max_http_body_bytes,
            server_header=False,
            timeout_graceful_shutdown=max(1, math.ceil(settings.grace_period_s)),
        )
        config.load()
        # The public gRPC port's certificate serves the HTTP API too: with TLS configured, it is HTTPS only.
        self.tls: ReloadingTlsContext | None = None
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
