"""Process start-up helpers shared by both services' ``main()``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import threading
import wsgiref.simple_server
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource
from pythonjsonlogger.json import JsonFormatter

from omnigate import tracing
from omnigate.tracing import LogContextFilter

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

LOG_FORMATS = ("json", "text")


def configure_logging(
    level: str, log_format: str = "text", service: str = "", stream: TextIO | None = None
) -> None:
    """Root logging to stderr (or ``stream``): one JSON object per line, or plain text.

    JSON fields: time (UTC, ISO 8601), level, logger, message, service, then request_id, trace_id and
    span_id when the record was made inside a request (``omnigate.tracing``), then any ``extra`` fields.
    Text lines end with ``[request_id=...]`` inside a request.
    """
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format, service, stream)], force=True)


def log_handler(log_format: str, service: str = "", stream: TextIO | None = None) -> logging.Handler:
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

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
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


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> int | None:
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
    server: ThreadingWSGIServer = wsgiref.simple_server.make_server(
        str(address[0]),
        port,
        _metrics_app(make_wsgi_app(registry)),
        server_class,
        handler_class=_QuietHandler,
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

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass


def run_service(service: str, settings: Any, serve: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    """Runs ``serve(settings)`` with the service's logging and tracing set up; the spans still batched are
    exported on the way out, however it ends. A port that is taken ends the process with one error line
    naming the port and its setting (exit status 1), not a traceback."""
    configure_logging(settings.log_level, settings.log_format, service)
    tracing.configure(service, otlp_endpoint=settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    try:
        asyncio.run(serve(settings))
    except PortInUseError as e:
        logging.getLogger(service).error("%s", e)
        raise SystemExit(1) from None
    finally:
        tracing.shutdown(service)


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def settings_from_command_line(
    settings_cls: type[SettingsT],
    prog: str,
    description: str,
    epilog: str = "",
    args: list[str] | None = None,
) -> SettingsT:
    """The service's settings from its flags and environment (flags win), with a ``--help`` that says what
    the service does and lists every setting as a flag and an environment variable, with its description
    and default. An invalid value ends the process with a short message (exit status 2), not a traceback.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [-h] [--SETTING VALUE ...]",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    source: CliSettingsSource[SettingsT] = CliSettingsSource(
        settings_cls,
        root_parser=parser,
        cli_parse_args=True if args is None else args,
        cli_show_env_vars=True,
    )
    try:
        return settings_cls(_cli_settings_source=source)
    except ValidationError as e:
        prefix = settings_cls.model_config.get("env_prefix", "")
        problems = []
        for error in e.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            where = f"{prefix}{field.upper()} (--{field.replace('_', '-')}): " if field else ""
            problems.append(
                f"  {where}{error['msg']} (got {error.get('input')!r})" if field else f"  {error['msg']}"
            )
        parser.exit(2, f"{prog}: invalid settings:\n" + "\n".join(problems) + "\n")


@dataclass(frozen=True)
class Listener:
    """A port a service listens on, and how a user picks another one."""

    what: str  # "gateway gRPC"
    host: str
    port: int  # 0 = OS-chosen, -1 = off
    setting: str  # the environment variable, e.g. OMNIGATE_GATEWAY_PORT
    make_variable: str | None = None  # the variable of `make run` (the local profile) setting it, if any

    def in_use_message(self) -> str:
        how = f"make run {self.make_variable}=... or " if self.make_variable else ""
        where = f"{self.what} on {self.host}"
        return f"port {self.port} is in use ({where}); choose another with {how}{self.setting}=..."


class PortInUseError(Exception):
    """A port a service is set to listen on is taken by another process."""

    def __init__(self, listener: Listener) -> None:
        super().__init__(listener.in_use_message())
        self.listener = listener


def check_ports_free(listeners: Iterable[Listener]) -> None:
    """Raises ``PortInUseError`` for the first fixed port that another process listens on.

    Checked before anything starts, with a plain bind: gRPC servers bind with SO_REUSEPORT, so a second
    server on a port another gRPC server holds (a second `make run`) would share it silently instead of
    failing.
    """
    for listener in listeners:
        if listener.port > 0 and _in_use(listener.host, listener.port):
            raise PortInUseError(listener)


@contextlib.contextmanager
def binding(listener: Listener) -> Iterator[None]:
    """Turns a failure to bind ``listener``'s port into ``PortInUseError`` when the port is taken (another
    process took it after ``check_ports_free``)."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # RuntimeError: gRPC's "could not bind" (grpc_server)
        taken = getattr(e, "errno", None) == errno.EADDRINUSE
        if listener.port > 0 and (taken or _in_use(listener.host, listener.port)):
            raise PortInUseError(listener) from None
        raise


def _in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because another socket listens there."""
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return False  # an unusable host: the server's own bind reports it
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            # As servers bind: a connection of an earlier run in TIME_WAIT is no conflict.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False
