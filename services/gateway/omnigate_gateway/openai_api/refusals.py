"""A request the HTTP API refuses before it reaches the core: its count and its access line.

The core counts and logs every request it sees; a request refused before it (bad JSON or parameters, an
unknown route or method, a body too large, a malformed HTTP request) is counted here when it was a Generate
request, and gets its access line here, on the core's logger with the core's fields plus the HTTP status,
method, path (without its query string, where a client may put a credential), parameter and reason.
"""

from __future__ import annotations

from omnigate.errors import quote
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.observation import access_log

# The routes that are Generate calls (the others that reach the core are GetModelInfo).
GENERATE_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/images/generations",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
)

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


def count_refusal(metrics: GatewayMetrics, path: str, code: str) -> None:
    """A Generate request refused here, before the core (which counts everything it sees)."""
    if path in GENERATE_PATHS:
        metrics.requests.labels("Generate", code, "unknown").inc()


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
