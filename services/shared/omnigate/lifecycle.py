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
