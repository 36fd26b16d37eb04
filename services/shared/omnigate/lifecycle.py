"""Process start-up helpers shared by both services' ``main()``."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import socket
import threading
import wsgiref.simple_server
from collections.abc import Awaitable, Callable
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from omnigate import tracing
from omnigate.tracing import LogContextFilter

LOG_FORMATS = ("json", "text")


def configure_logging(level: str, log_format: str = "text", service: str = "", stream=None) -> None:
    """Root logging to stderr (or ``stream``): one JSON object per line, or plain text.

    JSON fields: time (UTC, ISO 8601), level, logger, message, service, then request_id, trace_id and
    span_id when the record was made inside a request (``omnigate.tracing``), then any ``extra`` fields.
    Text lines end with ``[request_id=...]`` inside a request.
    """
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format, service, stream)], force=True)


def log_handler(log_format: str, service: str = "", stream=None) -> logging.Handler:
    """The handler ``configure_logging`` installs (``log_format`` 'json' or 'text')."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream)
    handler.addFilter(LogContextFilter())
    handler.setFormatter(_JsonFormatter(service) if log_format == "json" else _TextFormatter())
    return handler


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging API
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [request_id={request_id}]" if request_id else line


class _JsonFormatter(JsonFormatter):
    def __init__(self, service: str) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"service": service} if service else None,
        )

    FIRST = ("level", "logger", "message", "service", "request_id", "trace_id", "span_id")

    def add_fields(self, log_data, record, message_dict) -> None:
        fields: dict = {}
        super().add_fields(fields, record, message_dict)
        log_data["time"] = datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
            timespec="milliseconds"
        )
        for key in self.FIRST:  # the fixed fields first, then extras and exc_info
            if key in fields:
                log_data[key] = fields.pop(key)
        log_data.update(fields)


def write_ports_file(path: str, grpc_port: int, metrics_port: int | None, **other_ports: int | None) -> None:
    """Writes the bound ports as JSON, atomically (tests start servers on OS-chosen ports and read this).

    ``other_ports`` adds more (``health_port=...``).
    """
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"grpc_port": grpc_port, "metrics_port": metrics_port, **other_ports}, f)
    os.replace(tmp, path)


def start_metrics_server(host: str, port: int, registry) -> int | None:
    """Serves ``registry`` on http://host:port/metrics (port 0 = OS-chosen, -1 = off); returns the port.

    prometheus_client's own WSGI app and server classes, as its ``start_http_server`` uses them, with one
    change (``_metrics_app``): HEAD is answered like GET without the body, where the library answers 405
    with a body, which HTTP clients reject (a HEAD answer has none).
    """
    from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

    if port < 0:
        return None
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server = wsgiref.simple_server.make_server(
        address[0], port, _metrics_app(make_wsgi_app(registry)), server_class, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server.server_port


_METRICS_METHODS = "GET, HEAD, OPTIONS"


def _metrics_app(app):
    """prometheus_client's WSGI app with HEAD answered as GET without the body (same status and headers,
    Content-Length included), and ``Allow`` naming HEAD too."""

    def metrics_app(environ, start_response):
        head = environ["REQUEST_METHOD"] == "HEAD"
        if head:
            environ = {**environ, "REQUEST_METHOD": "GET"}
        answer: dict = {}

        def capture(status, headers, exc_info=None):
            answer["status"], answer["headers"] = status, headers
            return lambda data: None  # the library returns its body; it never calls write()

        body = b"".join(app(environ, capture))
        headers = [(k, v) for k, v in answer["headers"] if k.lower() not in ("allow", "content-length")]
        if any(k.lower() == "allow" for k, _ in answer["headers"]):
            headers.append(("Allow", _METRICS_METHODS))
        headers.append(("Content-Length", str(len(body))))
        start_response(answer["status"], headers)
        return [] if head else [body]

    return metrics_app


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    """Logs no line per scrape (as prometheus_client's own handler)."""

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass


def run_service(service: str, settings, serve: Callable[[Any], Awaitable[None]]) -> None:
    """Runs ``serve(settings)`` with the service's logging and tracing set up; the spans still batched are
    exported on the way out, however it ends."""
    configure_logging(settings.log_level, settings.log_format, service)
    tracing.configure(service, otlp_endpoint=settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    try:
        asyncio.run(serve(settings))
    finally:
        tracing.shutdown(service)
