"""Process start-up helpers shared by both services' ``main()``."""

from __future__ import annotations

import json
import logging
import os


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def write_ports_file(path: str, grpc_port: int, metrics_port: int | None) -> None:
    """Writes the bound ports as JSON, atomically (tests start servers on OS-chosen ports and read this)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"grpc_port": grpc_port, "metrics_port": metrics_port}, f)
    os.replace(tmp, path)


def start_metrics_server(host: str, port: int, registry) -> int | None:
    """Serves ``registry`` on http://host:port/metrics (port 0 = OS-chosen, -1 = off); returns the port."""
    from prometheus_client import start_http_server

    if port < 0:
        return None
    server, _ = start_http_server(port, addr=host, registry=registry)
    logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server.server_port
