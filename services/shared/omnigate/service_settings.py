"""Settings every Omnigate service has (the ports file, logs, traces); each service's settings class adds
its own and its environment prefix (``OMNIGATE_GATEWAY_``, ``OMNIGATE_WORKER_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings


class ServiceSettings(BaseSettings):
    ports_file: str | None = Field(
        None, description="Write the bound ports as JSON to this file once listening (for tests and scripts)."
    )
    log_level: str = Field("INFO", description="Python log level.")
    log_format: str = Field(
        "json",
        pattern="^(json|text)$",
        description="Log lines as 'json' (one object per line: time, level, logger, message, service, "
        "request_id, trace_id, span_id) or 'text'.",
    )
    otlp_endpoint: str | None = Field(
        None,
        pattern="^(https?://.+)?$",
        description="OTLP/gRPC endpoint receiving traces (http://host:4317 plaintext, https://host:4317 "
        "TLS); unset or empty = traces are not exported.",
    )
    trace_sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of new traces sampled when exporting (a caller's sampling decision is followed).",
    )
