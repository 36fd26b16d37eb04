"""Prometheus metrics of the worker (declared once, here; the contract is docs/metrics.md)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
# Inter-token latency: a decode step takes ~5-100 ms on a GPU, more on a loaded CPU.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Speech generation wall time / audio seconds (below 1 = faster than real time).
REAL_TIME_FACTOR_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50)

CANCEL_REASONS = ("client", "deadline")
REJECTION_REASONS = ("queue_full", "draining", "not_ready", "invalid_argument", "too_long", "out_of_memory")


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
        self.time_to_first_token = Histogram(
            "omnigate_worker_time_to_first_token_seconds",
            "Time from receiving a Generate request to its first streamed text delta.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "omnigate_worker_inter_token_latency_seconds",
            "Time between consecutive generated text tokens of one request.",
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "omnigate_worker_queue_wait_seconds",
            "Time from accepting a request to the engine starting it (preprocessing and queue).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generation_latency = Histogram(
            "omnigate_worker_generation_duration_seconds",
            "Time from the engine starting a request to its end (prefill and decoding; no queue).",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.decode_step = Histogram(
            "omnigate_worker_decode_step_seconds",
            "Wall time of one batched decode step (forward, sampling, bookkeeping), by batch-size bucket.",
            ["batch"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "omnigate_worker_batch_size",
            "Requests in the continuous batch, observed once per decode step.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "omnigate_worker_generated_tokens_total", "Text tokens generated.", registry=registry
        )
        self.prompt_tokens = Counter(
            "omnigate_worker_prompt_tokens_total", "Prompt tokens processed.", registry=registry
        )
        self.audio_generated = Counter(
            "omnigate_worker_audio_generated_seconds_total", "Seconds of speech generated.", registry=registry
        )
        self.speech_real_time_factor = Histogram(
            "omnigate_worker_speech_real_time_factor",
            "Per speech request: generation wall time divided by the seconds of audio produced.",
            buckets=REAL_TIME_FACTOR_BUCKETS,
            registry=registry,
        )
        self.time_to_first_audio = Histogram(
            "omnigate_worker_time_to_first_audio_seconds",
            "Per speech request: time from receiving the Generate request to its first audio chunk.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.audio_underrun = Histogram(
            "omnigate_worker_audio_underrun_seconds",
            "Per speech request: seconds a client playing the stream in real time from its first chunk would "
            "have had nothing to play.",
            buckets=(0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "omnigate_worker_queue_depth", "Requests waiting for the engine.", registry=registry
        )
        self.in_flight = Gauge(
            "omnigate_worker_in_flight_requests", "Requests accepted and not yet finished.", registry=registry
        )
        self.cancelled = Counter(
            "omnigate_worker_cancelled_requests_total",
            "Requests stopped before they finished, by reason (client, deadline).",
            ["reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "omnigate_worker_rejected_requests_total",
            "Requests refused or failed for a known reason, by reason (queue_full, draining, not_ready, "
            "invalid_argument, too_long, out_of_memory).",
            ["reason"],
            registry=registry,
        )
        for reason in CANCEL_REASONS:
            self.cancelled.labels(reason)  # every reason exported from the start, at 0
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        self.model_load = Gauge(
            "omnigate_worker_model_load_seconds",
            "Seconds the model took to load and warm up.",
            registry=registry,
        )
        self.info = Gauge(
            "omnigate_worker_info",
            "Always 1; the model this worker serves, its torch device and dtype.",
            ["model", "device", "dtype"],
            registry=registry,
        )
        self._gpu: GpuMemoryCollector | None = None

    def set_model(self, model: str, device: str, dtype: str) -> None:
        """Records what the worker serves; on a CUDA device, also exports that device's memory."""
        self.info.clear()
        self.info.labels(model, device, dtype).set(1)
        if device.startswith("cuda") and self._gpu is None:
            self._gpu = GpuMemoryCollector([device])
            self.registry.register(self._gpu)

    def token_clock(self, then: Callable[[int], None]) -> TokenClock:
        """A per-request token callback that observes inter-token latency, then calls ``then``."""
        return TokenClock(self.inter_token_latency, then)


class TokenClock:
    """Observes the time between consecutive token callbacks of one request (one ``monotonic`` and one
    ``observe`` per token), then hands the call on."""

    __slots__ = ("_histogram", "_last", "_then")

    def __init__(self, histogram: Histogram, then: Callable[[int], None]) -> None:
        self._histogram = histogram
        self._then = then
        self._last: float | None = None

    def __call__(self, count: int) -> None:
        now = time.monotonic()
        if self._last is not None:
            self._histogram.observe(now - self._last)
        self._last = now
        self._then(count)


class GpuMemoryCollector(Collector):
    """Memory of the worker's CUDA devices, read from torch at scrape time.

    Exports nothing unless CUDA is available and already initialised in this process (the worker put its
    model there): a scrape never creates a CUDA context. ``cuda`` is ``torch.cuda`` unless a test passes
    another module with the same functions.
    """

    def __init__(self, devices: list[str], cuda: Any = None) -> None:
        self._devices = devices
        self._cuda = cuda

    def _cuda_module(self) -> Any:
        if self._cuda is None:
            import torch  # imported on first scrape: the worker has loaded torch by then

            self._cuda = torch.cuda
        return self._cuda

    def collect(self) -> Iterator[GaugeMetricFamily]:
        cuda = self._cuda_module()
        if not cuda.is_available() or not cuda.is_initialized():
            return
        used = GaugeMetricFamily(
            "omnigate_worker_gpu_memory_used_bytes",
            "Memory in use on the CUDA device (total minus free, all processes), read at scrape time.",
            labels=["device"],
        )
        total = GaugeMetricFamily(
            "omnigate_worker_gpu_memory_total_bytes",
            "Total memory of the CUDA device, read at scrape time.",
            labels=["device"],
        )
        for device in self._devices:
            free_bytes, total_bytes = cuda.mem_get_info(device)
            used.add_metric([device], total_bytes - free_bytes)
            total.add_metric([device], total_bytes)
        yield used
        yield total

    def describe(self) -> list:
        return []  # nothing to check at registration; names appear only when CUDA is in use


class Playback:
    """A listener playing a speech stream in real time from its first chunk: how long it would have waited
    with nothing to play (underrun) after that first chunk."""

    def __init__(self) -> None:
        self.first_at: float | None = None
        self._play_end = 0.0
        self.underrun_s = 0.0

    def chunk(self, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.first_at is None:
            self.first_at = now
        elif now > self._play_end:
            self.underrun_s += now - self._play_end
        self._play_end = max(self._play_end, now) + seconds
