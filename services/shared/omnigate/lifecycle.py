"""Process start-up helpers shared by both services' ``main()``."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
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
    """Serves ``registry`` on http://host:port/metrics (port 0 = OS-chosen, -1 = off); returns the port."""
    from prometheus_client import start_http_server

    if port < 0:
        return None
    server, _ = start_http_server(port, addr=host, registry=registry)
    logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server.server_port


def run_service(service: str, settings, serve: Callable[[Any], Awaitable[None]]) -> None:
    """Runs ``serve(settings)`` with the service's logging and tracing set up; the spans still batched are
    exported on the way out, however it ends."""
    configure_logging(settings.log_level, settings.log_format, service)
    tracing.configure(service, otlp_endpoint=settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    try:
        asyncio.run(serve(settings))
    finally:
        tracing.shutdown(service)
