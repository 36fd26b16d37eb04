"""The worker's GPU memory metrics: exported only while the worker's model is on a CUDA device."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from omnigate_worker.metrics import GpuMemoryCollector, WorkerMetrics

GPU_METRICS = {"omnigate_worker_gpu_memory_used_bytes", "omnigate_worker_gpu_memory_total_bytes"}


def _families(registry: CollectorRegistry) -> dict:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_nothing_is_exported_and_nothing_fails():
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.set_model("models/tiny", "cpu", "float32")
    families = _families(registry)
    assert not GPU_METRICS & families.keys()
    (info,) = families["omnigate_worker_info"].samples
    assert info.labels == {"model": "models/tiny", "device": "cpu", "dtype": "float32"} and info.value == 1

    # Even a collector told about a CUDA device (a worker set to cuda:0 on a machine without one) scrapes
    # cleanly: no series, no exception, no attempt to initialise CUDA.
    registry.register(GpuMemoryCollector(["cuda:0"]))
    assert not GPU_METRICS & _families(registry).keys()
    assert not torch.cuda.is_initialized()


class FakeCuda:
    """A fake ``torch.cuda`` (control flow only: which series a scrape yields in each CUDA state)."""

    def __init__(self, available: bool, initialized: bool) -> None:
        self.available, self.initialized = available, initialized
        self.queried: list[str] = []

    def is_available(self) -> bool:
        return self.available

    def is_initialized(self) -> bool:
        return self.initialized

    def mem_get_info(self, device: str) -> tuple[int, int]:
        self.queried.append(device)
        return 30 * 2**30, 80 * 2**30  # (free, total)


@pytest.mark.parametrize(("available", "initialized"), [(False, False), (True, False)])
def test_no_series_until_cuda_is_in_use(available, initialized):
    cuda = FakeCuda(available, initialized)
    assert list(GpuMemoryCollector(["cuda:0"], cuda=cuda).collect()) == []
    assert cuda.queried == [], "a scrape must not create a CUDA context"


def test_series_per_device_when_cuda_is_in_use():
    cuda = FakeCuda(True, True)
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector(["cuda:0", "cuda:1"], cuda=cuda))
    families = _families(registry)
    for name in GPU_METRICS:
        assert families[name].type == "gauge"
        assert [s.labels for s in families[name].samples] == [{"device": "cuda:0"}, {"device": "cuda:1"}]
    used = families["omnigate_worker_gpu_memory_used_bytes"].samples
    total = families["omnigate_worker_gpu_memory_total_bytes"].samples
    assert [s.value for s in used] == [50 * 2**30] * 2 and [s.value for s in total] == [80 * 2**30] * 2
    assert cuda.queried == ["cuda:0", "cuda:1"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_memory_is_reported():
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda:0")  # 256 MiB held while scraped
    metrics.set_model("models/tiny", "cuda:0", "bfloat16")
    families = _families(registry)
    (used,) = families["omnigate_worker_gpu_memory_used_bytes"].samples
    (total,) = families["omnigate_worker_gpu_memory_total_bytes"].samples
    assert used.labels == total.labels == {"device": "cuda:0"}
    assert total.value == torch.cuda.get_device_properties(0).total_memory
    assert block.numel() <= used.value < total.value
