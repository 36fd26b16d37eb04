"""Prometheus metrics of the gateway (declared once, here)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


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
        self.generated_tokens = Counter(
            "omnigate_gateway_generated_tokens_total", "Text tokens generated for clients.", registry=registry
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
            "concurrency_limited, invalid_argument, permission_denied, resource_exhausted, no_worker).",
            ["reason"],
            registry=registry,
        )
        self.workers = Gauge(
            "omnigate_gateway_workers",
            "Workers known to the gateway, by state (ready, not_ready, ejected, draining).",
            ["state"],
            registry=registry,
        )
