"""The slot runner (slots.py) on the real tiny models: exact outputs while rows join and leave, admission by
KV-cache memory, out-of-memory isolation, flat memory under sustained load, its settings.

Out-of-memory errors cannot be provoked on demand on a CPU, so two tests raise torch's own
``OutOfMemoryError`` from a forward hook on one module (``_FakeOutOfMemory``): they are about which
requests fail, not about memory."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from omnigate.conversation import ContentPart, Modality, Summary
from omnigate.errors import LimitExceeded
from omnigate.media import Audio, Image
from omnigate_worker.convert import model_info_to_proto
from omnigate_worker.engine import loading
from omnigate_worker.engine.transformers_engine import TransformersEngine
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.scheduler import Scheduler
from omnigate_worker.settings import WorkerSettings
from tests.support.stack import MODELS_DIR
from tests.worker.test_batching import _bench_set, _collect, _request, _text, _unbatched

OMNI = str(MODELS_DIR / "tiny-qwen2.5-omni")
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # tiny Omni thinker: K and V, 2 layers, 2 KV heads, head_dim 16, fp32


def _engine(loaded, model=OMNI, **settings) -> TransformersEngine:
    engine = TransformersEngine(loaded, WorkerSettings(model=model, **settings), model)
    engine.warmup()
    return engine


def _start(engine, **settings) -> tuple[Scheduler, WorkerMetrics]:
    metrics = WorkerMetrics(CollectorRegistry())
    scheduler = Scheduler(engine, WorkerSettings(model=OMNI, **settings), metrics)
    scheduler.start()
    return scheduler, metrics


def _largest_batch(metrics: WorkerMetrics) -> float:
    """The largest batch-size bucket any decode step was observed in."""
    samples = {
        s.labels["le"]: s.value
        for m in metrics.batch_size.collect()
        for s in m.samples
        if s.name.endswith("_bucket")
    }
    total = samples["+Inf"]
    return min(float(le) for le, count in samples.items() if count == total)


# ---- exact outputs ---------------------------------------------------------------------------------


async def test_rows_wait_for_slots_join_and_leave_mid_batch_with_exact_outputs(loaded_omni, engine):
    """Two slots, five mixed requests (text, image, audio, video, video with its audio track): rows wait for
    a free slot, join as others leave, and a leaver's slot is refilled by moving the last row into it; every
    output equals generate()'s."""
    small = _engine(loaded_omni, max_batch_size=2)
    assert small._pool.slots == 2
    moves = []
    move = small._pool.move
    small._pool.move = lambda *args: (moves.append(args), move(*args))  # a spy: the real move still runs
    requests = _bench_set()
    expected = [_unbatched(engine, r) for r in requests]
    scheduler, metrics = _start(small, max_batch_size=2)
    try:
        jobs = [scheduler.submit(r) for r in requests[:3]]
        await asyncio.sleep(0.05)  # the rest arrive while the first rows decode
        jobs += [scheduler.submit(r) for r in requests[3:]]
        results = await asyncio.gather(*(_collect(job) for job in jobs))
    finally:
        scheduler.shutdown()
        small.close()
    for (want_text, want), (got_text, events) in zip(expected, results, strict=True):
        assert got_text == want_text
        assert (events[-1].output_tokens, events[-1].prompt_tokens) == (
            want.output_tokens,
            want.prompt_tokens,
        )
    assert moves, "no row was moved into a freed slot"
    assert _largest_batch(metrics) == 2


async def test_long_prompts_prefill_in_chunks_between_decode_steps_with_exact_outputs(loaded_omni, engine):
    """With 16-token chunks every prompt of the mixed set (text, image, audio, video, video with its track)
    is prefilled chunk by chunk while other rows decode: outputs equal generate()'s, and rows kept decoding
    while a prompt was being prefilled."""
    chunked = _engine(loaded_omni, max_batch_size=4, prefill_tokens_per_step=16)
    requests = _bench_set()
    expected = [_unbatched(engine, r) for r in requests]
    chunks = []
    decoder = chunked._decoder.decoder
    handle = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: chunks.append(
            (kwargs.get("input_ids") is None, getattr(kwargs.get("input_ids"), "shape", (0,))[0])
        ),
        with_kwargs=True,
    )
    scheduler, _ = _start(chunked, max_batch_size=4, prefill_tokens_per_step=16)
    try:
        results = await asyncio.gather(*(_collect(scheduler.submit(r)) for r in requests))
    finally:
        handle.remove()
        scheduler.shutdown()
        chunked.close()
    for (want_text, want), (got_text, events) in zip(expected, results, strict=True):
        assert got_text == want_text
        assert (events[-1].output_tokens, events[-1].prompt_tokens) == (
            want.output_tokens,
            want.prompt_tokens,
        )
    # Chunk forwards (embeddings) interleaved with decode steps (ids): a decode step ran between two chunks.
    kinds = [is_chunk for is_chunk, _ in chunks]
    assert any(a and not b and c for a, b, c in zip(kinds, kinds[1:], kinds[2:], strict=False))


@pytest.mark.parametrize(
    ("family", "parts"),
    [
        ("tiny-janus", lambda: [ContentPart(Modality.IMAGE, image=_image()), _text("Describe this.")]),
        ("tiny-qwen2-audio", lambda: [ContentPart(Modality.AUDIO, audio=_audio()), _text("What is it?")]),
    ],
)
async def test_other_families_decode_exactly_over_slots(family, parts):
    path = str(MODELS_DIR / family)
    loaded = loading.load(path, "cpu", "auto", "auto", False)
    engine = _engine(loaded, model=path, max_batch_size=2)
    assert engine.info.decode_runner.startswith("slots")
    requests = [_request([_text("Hello there")], 12), _request(parts(), 9), _request([_text("Count")], 5)]
    expected = [_unbatched(engine, r) for r in requests]
    scheduler, _ = _start(engine, max_batch_size=2)
    try:
        results = await asyncio.gather(*(_collect(scheduler.submit(r)) for r in requests))
    finally:
        scheduler.shutdown()
        engine.close()
    for (want_text, want), (got_text, events) in zip(expected, results, strict=True):
        assert got_text == want_text
        assert events[-1].output_tokens == want.output_tokens


def _image() -> Image:
    return Image(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _audio() -> Audio:
    return Audio((0.1 * np.sin(np.arange(32000) * 0.04)).astype(np.float32), 16000)


# ---- admission by memory ---------------------------------------------------------------------------


async def test_a_small_kv_budget_admits_by_memory_and_refuses_what_never_fits(loaded_omni, engine):
    """A budget of 2 slots x 256 tokens: six requests all finish, never more than two decode at once, and
    one whose prompt plus max_new_tokens exceeds a slot is refused at once with RESOURCE_EXHAUSTED."""
    small = _engine(loaded_omni, max_batch_size=8, kv_cache_bytes=512 * BYTES_PER_TOKEN, kv_slot_tokens=256)
    assert (small._pool.slots, small._pool.slot_tokens) == (2, 256)
    assert "2 KV slots x 256 tokens" in small.info.decode_runner
    requests = [_request([_text(f"Tell me about the number {i}.")], 20 + i) for i in range(6)]
    expected = [_unbatched(engine, r) for r in requests]
    scheduler, metrics = _start(small, max_batch_size=8)
    try:
        with pytest.raises(LimitExceeded, match=r"needs \d+ tokens of KV cache; this worker holds 256"):
            await _collect(scheduler.submit(_request([_text("Too long")], 250)))
        results = await asyncio.gather(*(_collect(scheduler.submit(r)) for r in requests))
    finally:
        scheduler.shutdown()
        small.close()
    assert [text for text, _ in results] == [text for text, _ in expected]
    assert _largest_batch(metrics) == 2


def test_a_budget_that_holds_no_slot_is_refused_at_start(loaded_omni):
    with pytest.raises(ValueError, match="holds no slot"):
        TransformersEngine(loaded_omni, WorkerSettings(model=OMNI, kv_cache_bytes=BYTES_PER_TOKEN), OMNI)


# ---- out of memory fails only the request that caused it --------------------------------------------


class _FakeOutOfMemory:
    """A forward pre-hook raising torch's OutOfMemoryError when ``when(args, kwargs)`` holds (once)."""

    def __init__(self, module, when) -> None:
        self.when = when
        self.fired = 0
        self._handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if not self.fired and self.when(args, kwargs):
            self.fired += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake, test)")

    def remove(self) -> None:
        self._handle.remove()


async def test_out_of_memory_in_a_shared_decode_step_fails_only_the_newest_row(loaded_omni, engine):
    slot_engine = _engine(loaded_omni, max_batch_size=4)
    requests = [_request([_text(f"Story number {i}, please.")], 24) for i in range(3)]
    expected = [_unbatched(engine, r) for r in requests]
    decoder = slot_engine._decoder.decoder
    # Decode steps feed the decoder token ids (the prefill feeds it embeddings): the step at three rows.
    fake = _FakeOutOfMemory(
        decoder, lambda args, kwargs: getattr(kwargs.get("input_ids"), "shape", (0,))[0] == 3
    )
    scheduler, _ = _start(slot_engine, max_batch_size=4, max_batch_wait_ms=200)
    try:
        results = await asyncio.gather(
            *(_collect(scheduler.submit(r)) for r in requests), return_exceptions=True
        )
    finally:
        fake.remove()
        scheduler.shutdown()
        slot_engine.close()
    assert fake.fired == 1
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert len(failed) == 1, results
    error = results[failed[0]]
    assert isinstance(error, LimitExceeded) and "out of memory" in str(error) and error.retry_after_s
    for i, result in enumerate(results):
        if i not in failed:
            assert result[0] == expected[i][0]


async def test_out_of_memory_in_a_prefill_fails_only_that_request(loaded_omni, engine):
    slot_engine = _engine(loaded_omni, max_batch_size=4)
    audio_request = _request([ContentPart(Modality.AUDIO, audio=_audio()), _text("What is it?")], 10)
    texts = [_request([_text(f"Poem {i}")], 16) for i in range(2)]
    expected = [_unbatched(engine, r) for r in texts]
    fake = _FakeOutOfMemory(slot_engine._model.thinker.model.audio_tower, lambda args, kwargs: True)
    scheduler, metrics = _start(slot_engine, max_batch_size=4)
    try:
        first = scheduler.submit(texts[0])
        await asyncio.sleep(0.02)
        audio = scheduler.submit(audio_request)
        second = scheduler.submit(texts[1])
        results = await asyncio.gather(
            _collect(first), _collect(audio), _collect(second), return_exceptions=True
        )
    finally:
        fake.remove()
        scheduler.shutdown()
        slot_engine.close()
    assert isinstance(results[1], LimitExceeded) and "out of memory" in str(results[1])
    assert [results[0][0], results[2][0]] == [text for text, _ in expected]
    assert metrics.rejected.labels("out_of_memory")._value.get() == 1


# ---- memory stays flat -------------------------------------------------------------------------------


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_memory_stays_flat_under_sustained_batched_load(loaded_omni):
    """Sixteen rows decoding 200 tokens each, again and again for a few seconds: the process's resident
    memory at the end is within 2% (+16 MiB for allocator noise) of what it was a third of the way in. A
    step that kept autograd history grew by a copy of the batch's cache every step (hundreds of MiB here)."""
    slot_engine = _engine(loaded_omni, max_batch_size=16)
    scheduler, metrics = _start(slot_engine, max_batch_size=16, max_queue=64)
    stop = time.monotonic() + 9.0
    samples: list[int] = []

    async def client(i: int) -> None:
        while time.monotonic() < stop:
            _, events = await _collect(scheduler.submit(_request([_text(f"Go on {i}")], 200, 200)))
            assert isinstance(events[-1], Summary) and events[-1].output_tokens == 200

    async def sample() -> None:
        await asyncio.sleep(3.0)
        samples.append(_rss())
        while time.monotonic() < stop:
            await asyncio.sleep(0.5)
        samples.append(_rss())

    try:
        await asyncio.gather(sample(), *(client(i) for i in range(16)))
    finally:
        scheduler.shutdown()
        slot_engine.close()
    first, last = samples
    assert last - first <= 0.02 * first + 16 * 2**20, (first, last)
    assert metrics.decode_step.labels("16")._sum.get() > 0  # the steps ran at batch 16


# ---- settings and reporting --------------------------------------------------------------------------


def test_settings_that_cannot_work_fail_at_start(loaded_omni):
    with pytest.raises(ValueError, match="sdpa_backends"):
        TransformersEngine(loaded_omni, WorkerSettings(model=OMNI, sdpa_backends="warp"), OMNI)
    with pytest.raises(ValueError, match="decode_runner"):
        TransformersEngine(loaded_omni, WorkerSettings(model=OMNI, decode_runner="fast"), OMNI)
    gemma = str(MODELS_DIR / "tiny-gemma3n")
    with pytest.raises(ValueError, match="sliding_attention"):
        TransformersEngine(
            loading.load(gemma, "cpu", "auto", "auto", False),
            WorkerSettings(model=gemma, decode_runner="slots"),
            gemma,
        )


def test_model_info_names_the_attention_kernels_and_the_runner(engine, dynamic_engine):
    info = model_info_to_proto(engine.info, 4096, 1 << 20)
    assert info.decode_runner == (
        "slots: 32 KV slots x 36864 tokens (0.56 GiB), eager; speech: batched talker over 8 KV slots x 36866 "
        "tokens (0.07 GiB), vocoder thread"
    )
    assert info.attention == "prompt sdpa; decode sdpa (torch's choice)"
    assert model_info_to_proto(dynamic_engine.info, 4096, 1 << 20).decode_runner == "dynamic cache"


# ---- CUDA graphs (on a GPU only) ---------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_cuda_graph_steps_equal_eager_steps():
    loaded = loading.load(OMNI, "cuda", "float32", "auto", False)
    graphs = _engine(loaded, max_batch_size=8)
    eager = _engine(loaded, max_batch_size=8, cuda_graphs=False)
    requests = [_request([_text(f"Tell me {i} things.")], 16 + i) for i in range(5)]
    outputs = []
    for engine in (graphs, eager):
        scheduler, _ = _start(engine, max_batch_size=8)
        try:
            outputs.append(
                [text for text, _ in await asyncio.gather(*(_collect(scheduler.submit(r)) for r in requests))]
            )
        finally:
            scheduler.shutdown()
    assert graphs._pool.graphs and not eager._pool.graphs
    assert outputs[0] == outputs[1]
