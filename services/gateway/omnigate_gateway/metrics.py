"""Prometheus metrics of the gateway (declared once, here; the contract is docs/metrics.md)."""

from __future__ import annotations

from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
# Media fetch and decode: from a few ms (a small inline image) to the decode limit (60 s by default).
MEDIA_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)

# Why a request was refused before it reached a worker (the rejected counter's label values).
REJECTION_REASONS = (
    "unauthenticated",
    "rate_limited",
    "concurrency_limited",
    "invalid_argument",
    "permission_denied",
    "resource_exhausted",
    "deadline_exceeded",
    "no_worker",
)
# The reasons the core itself gives, from the gRPC status of a request that failed before reaching a
# worker (authentication and admission count their own: unauthenticated, rate_limited, ...).
REJECTION_BY_CODE = {
    "INVALID_ARGUMENT": "invalid_argument",
    "PERMISSION_DENIED": "permission_denied",
    "RESOURCE_EXHAUSTED": "resource_exhausted",
    "DEADLINE_EXCEEDED": "deadline_exceeded",
    "UNAVAILABLE": "no_worker",
}


# How a realtime answer ended (the realtime responses counter's label values; OpenAI's response statuses).
REALTIME_RESPONSE_STATUSES = ("completed", "incomplete", "cancelled", "failed")


def _version() -> str:
    try:
        return metadata.version("omnigate")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


class GatewayMetrics:
    """The gateway's metrics on one registry (tests pass a private one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "omnigate_gateway_requests_total",
            "Requests finished, by RPC, gRPC status code and requested output modality.",
            ["rpc", "code", "mode"],
            registry=registry,
        )
        self.request_latency = Histogram(
            "omnigate_gateway_request_duration_seconds",
            "End-to-end Generate latency, observed when the stream ends.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_output = Histogram(
            "omnigate_gateway_time_to_first_output_seconds",
            "Time from receiving a Generate request to sending its first text, audio or image event.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "omnigate_gateway_time_to_first_token_seconds",
            "Time from receiving a Generate request to sending its first text delta.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_audio = Histogram(
            "omnigate_gateway_time_to_first_audio_seconds",
            "Time from receiving a Generate request to sending its first audio chunk.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "omnigate_gateway_generated_tokens_total", "Text tokens generated for clients.", registry=registry
        )
        self.media_fetch_latency = Histogram(
            "omnigate_gateway_media_fetch_duration_seconds",
            "Time to obtain the encoded bytes of one media item (download, file read or inline), "
            "by modality and source.",
            ["modality", "source"],
            buckets=MEDIA_BUCKETS,
            registry=registry,
        )
        self.media_decode_latency = Histogram(
            "omnigate_gateway_media_decode_duration_seconds",
            "Time to decode one media item on the decode pool, by modality.",
            ["modality"],
            buckets=MEDIA_BUCKETS,
            registry=registry,
        )
        self.media_latency = Histogram(
            "omnigate_gateway_media_duration_seconds",
            "Time to fetch and decode one media item, by modality.",
            ["modality"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.media_bytes = Counter(
            "omnigate_gateway_media_bytes_total",
            "Encoded media bytes received (fetched or inline), by modality.",
            ["modality"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "omnigate_gateway_in_flight_requests", "Generate requests being served.", registry=registry
        )
        self.admitted = Gauge(
            "omnigate_gateway_admitted_requests",
            "Generate requests past authentication, rate limits and validation and not finished: waiting "
            "for a ready worker or served by one (the demand that wakes scaled-to-zero workers).",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "omnigate_gateway_upstream_errors_total",
            "Failed calls to workers, by gRPC status code (a retried call counts once per attempt).",
            ["code"],
            registry=registry,
        )
        self.upstream_retries = Counter(
            "omnigate_gateway_upstream_retries_total",
            "Generate requests sent again to another worker after one failed before any output.",
            registry=registry,
        )
        self.rejected = Counter(
            "omnigate_gateway_rejected_requests_total",
            "Requests refused before reaching a worker, by reason (unauthenticated, rate_limited, "
            "concurrency_limited, invalid_argument, permission_denied, resource_exhausted, "
            "deadline_exceeded, no_worker).",
            ["reason"],
            registry=registry,
        )
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)  # every reason exported from the start, at 0
        self.workers = Gauge(
            "omnigate_gateway_workers",
            "Workers known to the gateway, by state (ready, not_ready, ejected, draining).",
            ["state"],
            registry=registry,
        )
        self.realtime_sessions = Gauge(
            "omnigate_gateway_realtime_sessions",
            "Realtime conversation sessions open (/v1/realtime WebSocket connections past the handshake).",
            registry=registry,
        )
        self.realtime_responses = Counter(
            "omnigate_gateway_realtime_responses_total",
            "Realtime answers (turns) finished, by status (completed, incomplete, cancelled, failed).",
            ["status"],
            registry=registry,
        )
        for status in REALTIME_RESPONSE_STATUSES:
            self.realtime_responses.labels(status)
        self.realtime_barge_ins = Counter(
            "omnigate_gateway_realtime_barge_ins_total",
            "Realtime answers cancelled because the user started speaking (server VAD barge-in).",
            registry=registry,
        )
        self.realtime_barge_in_latency = Histogram(
            "omnigate_gateway_realtime_barge_in_seconds",
            "Time from detecting the user's speech to the interrupted answer's worker call being cancelled.",
            buckets=MEDIA_BUCKETS,
            registry=registry,
        )
        self.info = Gauge(
            "omnigate_gateway_info",
            "Always 1; the Omnigate version of this gateway.",
            ["version"],
            registry=registry,
        )
        self.info.labels(_version()).set(1)

    def count_rejection(self, code_name: str) -> None:
        """Counts a request refused before reaching a worker, by the name of its gRPC status code."""
        reason = REJECTION_BY_CODE.get(code_name)
        if reason is not None:
            self.rejected.labels(reason).inc()
