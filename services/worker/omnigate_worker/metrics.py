"""Prometheus metrics of the worker (declared once, here)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class WorkerMetrics:
    """The worker's metrics on one registry (tests pass a private one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "omnigate_worker_requests_total",
            "Generate requests finished, by gRPC status code and generation mode.",
            ["code", "mode"],
            registry=registry,
        )
        self.request_latency = Histogram(
            "omnigate_worker_request_duration_seconds",
            "Time from receiving a Generate request to the end of its stream.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_output = Histogram(
            "omnigate_worker_time_to_first_output_seconds",
            "Time from receiving a Generate request to its first streamed output.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "omnigate_worker_generated_tokens_total", "Text tokens generated.", registry=registry
        )
        self.prompt_tokens = Counter(
            "omnigate_worker_prompt_tokens_total", "Prompt tokens processed.", registry=registry
        )
        self.queue_depth = Gauge(
            "omnigate_worker_queue_depth", "Requests waiting for the engine.", registry=registry
        )
        self.in_flight = Gauge(
            "omnigate_worker_in_flight_requests", "Requests accepted and not yet finished.", registry=registry
        )
        self.model_load = Gauge(
            "omnigate_worker_model_load_seconds",
            "Seconds the model took to load and warm up.",
            registry=registry,
        )
