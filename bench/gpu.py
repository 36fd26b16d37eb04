"""The worker at GPU speed: transformers' own generate vs Omnigate's engine, in one process.

    python -m bench.gpu [--size tiny|3b|7b] [--device auto|cpu|cuda] [--levels 1,16,64,128]
                        [--output-tokens 128] [--soak-seconds 180] [--step-batches 1,2,4,...,64] [--quick]
                        [--speech-levels 1,4,8] [--speech-tokens 32] [--no-speech]

1. The model. ``--size tiny`` (the default without CUDA) loads models/tiny-qwen2.5-omni through the worker's
   own loader. ``--size 3b`` (the default on CUDA) and ``7b`` build a random-weights Qwen2.5-Omni with the
   published dimensions directly on the GPU in bf16 (no download; ../shared/notes/models.md, "Real-size
   model"), with the tiny checkpoint's tokenizer and processor at the published pixel bounds. Random weights
   rarely emit end-of-sequence, so every request has a fixed length (min_new_tokens = max_new_tokens).
2. Baseline: the guide's way, one request at a time: chat template, processor, ``model.generate`` with
   ``generation_mode="text"`` and ``thinker_max_new_tokens``/``thinker_min_new_tokens`` (Qwen2.5-Omni ignores
   ``max_new_tokens``), on a mixed set: text, text+image, text+audio, text+video, video with its audio track.
3. Omnigate: ``TransformersEngine`` + ``Scheduler`` in this process (no gRPC, no media fetching), the same
   requests submitted from asyncio by closed-loop clients at each concurrency level.
4. Speech (issue 14): spoken answers (``GenerationMode.AUDIO``, a short text prompt, greedy thinker with
   min = max tokens, a seed per request) submitted to the same scheduler by closed-loop clients at each
   speech level (the pipelined thinker, talker and vocoder stages, speech.py), then the same requests as the
   highest level one after another through ``engine.generate`` (transformers' generate with the talker
   streamer: how speech ran before the pipeline, alone and one at a time). Per request, as the client sees
   it: time to first audio (submit to the first ``AudioChunk``), real-time factor (submit to the stream's
   end over the seconds of audio), and underrun (a client that starts playing at the first chunk and plays
   in real time waits this long for later chunks); per level, audio seconds per wall second. The scheduler's
   decode-step histogram below leaves these steps out (a speech step includes the talker's).
5. One batched decode step per batch size (``engine.open_batch`` / ``start_row`` / ``batch.step``), next to
   its bandwidth floor: the bytes a step must read (decoder and lm-head weights, the batch's KV cache) over
   the device's measured copy bandwidth.
6. On CUDA, the decode step with each SDPA backend choice (``WorkerSettings.sdpa_backends``).
7. Memory (CUDA: allocated and peak; CPU: the process's RSS) after warm-up, then during a soak at
   concurrency 64, at a third of it and at its end, and once idle after it.

How tokens are timed: with random weights the tiny tokenizer decodes real-size ids to empty text, so text
deltas cannot time tokens. Time to first token is when the engine picked the request's first token (the
scheduler's ``Job.prefilled_at``, set as its row joins the batch; the prompts here, up to ~800 tokens, stay
under ``prefill_tokens_per_step``, so none is prefilled in chunks) minus when it was submitted; inter-token
latency is the engine's own ``omnigate_worker_inter_token_latency_seconds`` histogram (one observation per
generated token, by the worker's TokenStreamer), read as the difference over each level and interpolated
within buckets as Prometheus' ``histogram_quantile`` does; the per-request mean (time from the first token
to the end over output tokens - 1) is reported next to it.

Writes bench/results/gpu.json and gpu.md (``--out-dir``), also after each section (``"partial": true``
until the end, so a run cut short still leaves its numbers), and prints the table. The targets (issues 13
and 14; speech: PASS/FAIL marks on CUDA only) are printed next to the numbers and never enforced: it exits 1
only when a request or a section failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from omnigate.conversation import (
    AudioChunk,
    ContentPart,
    GenerationMode,
    GenerationParams,
    GenerationRequest,
    Message,
    Modality,
    Summary,
    TextDelta,
)
from omnigate.media import Audio, Image, Video
from omnigate_worker.engine import inputs as model_inputs
from omnigate_worker.engine import loading
from omnigate_worker.engine.transformers_engine import TransformersEngine
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.scheduler import Scheduler
from omnigate_worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-qwen2.5-omni"

# Published dimensions (models.md, "Real-size model"; Qwen2.5-Omni-7B's config for 7b). Vision and audio
# towers are the same in both; their output width is the text width, as is the talker's input width.
_TALKER_3B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=8448,
    mrope_section=[8, 12, 12],  # sums to head_dim / 2
)
SIZES = {
    # 5.537 B parameters (published: ~5.54 B).
    "3b": {
        "text": dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
        ),
        "talker": _TALKER_3B,
    },
    # 10.73 B parameters (published: ~10.7 B). The 7B talker is the 3B one widened (intermediate 18944,
    # 12 heads / 4 kv of 128); with the 3B talker the count would be 9.78 B. The talker runs in the speech
    # section only: elsewhere it changes the memory in use, not the decode numbers.
    "7b": {
        "text": dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
        "talker": {
            **_TALKER_3B,
            "intermediate_size": 18944,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "mrope_section": [16, 24, 24],
        },
    },
}
VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
AUDIO = dict(
    d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128
)
# The published processor bounds (pixels of one image; of one video frame).
IMAGE_PIXELS = (3136, 12845056)
VIDEO_FRAME_PIXELS = (100352, 602112)

# Issue 13's targets, printed next to the numbers (never enforced).
TARGETS = {
    "decode_step_ms": {1: 6.0, 64: 10.0},
    "throughput_ratio_at_64": 150.0,
    "latency_ratio_at_1": 0.5,
    "memory_growth_pct": 2.0,
}
# Issue 14's speech targets (GPU, 3B size, bf16), printed next to the numbers with pass/fail marks on CUDA.
SPEECH_TARGETS = {
    "ttfa_p50_s": {1: 0.5, 8: 1.0},
    "rtf_max_at_8": 0.3,
    "underrun_total_s_at_8": 0.0,
    "throughput_ratio_at_8": 6.0,
}
SPEECH_PROMPT = "Tell me a story about a lighthouse keeper and a storm."

KINDS = ("text", "image", "audio", "video", "video_audio")
PROMPTS = {
    "text": "Tell me a story about a lighthouse keeper and a storm.",
    "image": "Describe this image.",
    "audio": "What do you hear in this audio?",
    "video": "Describe what happens in this video.",
    "video_audio": "Describe this video and what can be heard in it.",
}

# Run profiles: what a flag left out becomes (--quick: the CPU smoke test's settings).
FULL = dict(
    levels="1,16,64,128",
    output_tokens=128,
    soak_seconds=180.0,
    step_batches="1,2,4,8,16,32,64",
    steps=20,
    baseline_requests=5,
    requests_per_level=0,
    speech_levels="1,4,8",
    speech_tokens=32,
    speech_requests_per_level=0,
    speech_timeout_s=180.0,
)
QUICK = dict(
    levels="1,4",
    output_tokens=8,
    soak_seconds=3.0,
    step_batches="1,2,4",
    steps=5,
    baseline_requests=5,
    requests_per_level=0,
    speech_levels="1,4",
    speech_tokens=16,
    speech_requests_per_level=0,
    speech_timeout_s=45.0,
)
SDPA_CHOICES = ("cudnn", "flash,efficient", "efficient")
SDPA_BATCHES = (1, 16, 64)
ITL_METRIC = "omnigate_worker_inter_token_latency_seconds"
STEP_METRIC = "omnigate_worker_decode_step_seconds"


# ---- the model ------------------------------------------------------------------------------------


def load_model(size: str, device: str) -> tuple[loading.LoadedModel, str]:
    """The tiny checkpoint through the worker's loader, or a random real-size model built on the device."""
    if size == "tiny":
        loaded = loading.load(str(TINY), device, "auto", "sdpa", False)
        return loaded, str(TINY)
    from transformers import AutoProcessor, GenerationConfig, Qwen2_5OmniForConditionalGeneration
    from transformers.image_utils import SizeDict

    dev = loading.resolve_device(device)
    if dev.type != "cuda":
        raise SystemExit(
            f"--size {size} builds a {size} model on the GPU; this run has device {dev} (use --size tiny)"
        )
    loading.silence_known_load_warnings()
    config = real_size_config(size)
    with torch.device(dev):
        model = Qwen2_5OmniForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.generation_config = GenerationConfig.from_pretrained(TINY)  # as from_pretrained: its eos ids
    model.speaker_map = real_size_speakers(config)
    model.requires_grad_(False)
    model.eval()
    processor = AutoProcessor.from_pretrained(TINY)
    processor.image_processor.size = SizeDict(shortest_edge=IMAGE_PIXELS[0], longest_edge=IMAGE_PIXELS[1])
    processor.video_processor.size = SizeDict(
        shortest_edge=VIDEO_FRAME_PIXELS[0], longest_edge=VIDEO_FRAME_PIXELS[1]
    )
    loaded = loading.LoadedModel(
        model=model, processor=processor, device=dev, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    return loaded, f"random-weights Qwen2.5-Omni-{size.upper()} (tiny-qwen2.5-omni's tokenizer and processor)"


def real_size_config(size: str):
    """The tiny checkpoint's config (its token ids match the tiny tokenizer) with the published dimensions."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(TINY)
    thinker = config.thinker_config
    text = thinker.text_config
    for name, value in SIZES[size]["text"].items():
        setattr(text, name, value)
    layers = text.num_hidden_layers
    text.layer_types = ["full_attention"] * layers
    text.max_window_layers = layers
    text.rope_parameters["mrope_section"] = [16, 24, 24]  # head_dim 128: sums to 64
    for name, value in VISION.items():
        setattr(thinker.vision_config, name, value)
    thinker.vision_config.out_hidden_size = text.hidden_size
    for name, value in AUDIO.items():
        setattr(thinker.audio_config, name, value)
    thinker.audio_config.output_dim = text.hidden_size
    talker = config.talker_config
    for name, value in SIZES[size]["talker"].items():
        if name == "mrope_section":
            talker.rope_parameters["mrope_section"] = value
        else:
            setattr(talker, name, value)
    talker.embedding_size = text.hidden_size
    talker.layer_types = ["full_attention"] * talker.num_hidden_layers
    token2wav = type(config.token2wav_config)()  # transformers' defaults are the published token2wav
    # The talker's random codes reach 8447: a 8193-row code embedding would index out of range.
    token2wav.dit_config.num_embeds = talker.vocab_size
    config.token2wav_config = token2wav
    return config


def real_size_speakers(config) -> dict:
    """Speakers shaped for the real-size token2wav: cond (1, enc_emb_dim), ref_mel (1, T, mel_dim)."""
    tiny = torch.load(TINY / "spk_dict.pt", weights_only=True)
    dit = config.token2wav_config.dit_config
    generator = torch.Generator().manual_seed(0)
    return {
        name: {
            "bos_token": speaker["bos_token"],
            "cond": torch.randn(1, dit.enc_emb_dim, generator=generator),
            "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=generator),
        }
        for name, speaker in tiny.items()
    }


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- requests -------------------------------------------------------------------------------------


def make_media() -> dict:
    """Decoded media as the gateway hands it to the worker (numpy arrays; no files, no FFmpeg)."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:480, 0:640]
    picture = np.stack([xs * 255 // 639, ys * 255 // 479, (xs + ys) * 255 // 1118], axis=-1).astype(np.uint8)

    def tone(seconds: float, freq: float) -> np.ndarray:
        t = np.arange(int(seconds * 16000)) / 16000
        noise = 0.05 * rng.standard_normal(len(t))
        return (0.4 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)

    fps, count = 2.0, 8
    frames = np.empty((count, 240, 320, 3), dtype=np.uint8)
    for i in range(count):
        frames[i] = np.roll(picture[::2, ::2], shift=i * 16, axis=1)
    return {
        "image": Image(pixels=picture),
        "audio": Audio(samples=tone(5.0, 330.0), sample_rate=16000),
        "video": Video(
            frames=frames,
            timestamps_s=[i / fps for i in range(count)],
            sampled_fps=fps,
            source_fps=fps,
            duration_s=count / fps,
            source_num_frames=count,
            audio=Audio(samples=tone(count / fps, 440.0), sample_rate=16000),
        ),
    }


def build_request(kind: str, media: dict, output_tokens: int) -> GenerationRequest:
    parts = []
    if kind == "image":
        parts.append(ContentPart(Modality.IMAGE, image=media["image"]))
    elif kind == "audio":
        parts.append(ContentPart(Modality.AUDIO, audio=media["audio"]))
    elif kind in ("video", "video_audio"):
        parts.append(ContentPart(Modality.VIDEO, video=media["video"]))
    parts.append(ContentPart(Modality.TEXT, text=PROMPTS[kind]))
    return GenerationRequest(
        messages=[Message("user", parts)],
        params=GenerationParams(max_new_tokens=output_tokens, min_new_tokens=output_tokens),
        video_fps=media["video"].sampled_fps if kind.startswith("video") else None,
        use_audio_in_video=kind == "video_audio",
    )


def text_request(tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message("user", [ContentPart(Modality.TEXT, text=PROMPTS["text"])])],
        params=GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens),
    )


# ---- measuring helpers ----------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def histogram(registry: CollectorRegistry, name: str) -> dict[tuple, dict]:
    """Every series of a histogram: {labels without le: {"buckets": [(le, cumulative count)], "sum", "count"}}."""
    series: dict[tuple, dict] = {}
    for family in registry.collect():
        if family.name != name:
            continue
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            entry = series.setdefault(labels, {"buckets": [], "sum": 0.0, "count": 0.0})
            if sample.name.endswith("_bucket"):
                entry["buckets"].append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                entry["sum"] = sample.value
            elif sample.name.endswith("_count"):
                entry["count"] = sample.value
    return series


def histogram_delta(after: dict, before: dict | None) -> dict:
    if not before:
        return after
    return {
        "buckets": [(le, n - m) for (le, n), (_, m) in zip(after["buckets"], before["buckets"], strict=True)],
        "sum": after["sum"] - before["sum"],
        "count": after["count"] - before["count"],
    }


def histogram_quantile(q: float, entry: dict) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the q-quantile."""
    buckets = sorted(entry["buckets"])
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower  # above the highest finite bound: that bound, as Prometheus answers
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large on-device copy (each byte read once and written once)."""
    size = (1 << 30) if device.type == "cuda" else (1 << 27)
    reps = 10 if device.type == "cuda" else 3
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    took = time.perf_counter() - started
    del src, dst
    return 2 * size * reps / took


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_sample(label: str, device: torch.device, t0: float) -> dict:
    sample = {"label": label, "t_s": round(time.monotonic() - t0, 2), "rss_bytes": rss_bytes()}
    if device.type == "cuda":
        sample["allocated_bytes"] = torch.cuda.memory_allocated(device)
        sample["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        sample["reserved_bytes"] = torch.cuda.memory_reserved(device)
    return sample


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- baseline: transformers' generate, one request at a time --------------------------------------


def run_baseline(loaded: loading.LoadedModel, media: dict, output_tokens: int, requests: int) -> dict:
    """The model card's way: chat template, processor on the decoded media, ``model.generate``."""
    model, processor, device = loaded.model, loaded.processor, loaded.device

    def one(request: GenerationRequest, tokens: int) -> int:
        collected = model_inputs.collect(request)
        prompt = processor.apply_chat_template(collected.messages, add_generation_prompt=True, tokenize=False)
        kwargs = model_inputs.processor_kwargs(processor, collected, request.use_audio_in_video)
        inputs = processor(
            text=prompt,
            images=collected.images or None,
            videos=collected.videos or None,
            audio=collected.audio or None,
            return_tensors="pt",
            **kwargs,
        )
        inputs = inputs.to(device).to(dtype=loaded.dtype)
        sequences = model.generate(
            **inputs,
            generation_mode="text",
            thinker_max_new_tokens=tokens,
            thinker_min_new_tokens=tokens,
            thinker_do_sample=False,
            use_audio_in_video=request.use_audio_in_video,
        )
        sync(device)
        return int(sequences.shape[1]) - int(inputs["input_ids"].shape[1])

    for kind in KINDS:  # warm-up: one short request of each kind (kernels, plans, allocator)
        one(build_request(kind, media, 2), 2)
    latencies, tokens, by_kind = [], 0, {}
    started = time.perf_counter()
    for i in range(requests):
        kind = KINDS[i % len(KINDS)]
        t = time.perf_counter()
        tokens += one(build_request(kind, media, output_tokens), output_tokens)
        latencies.append(time.perf_counter() - t)
        by_kind.setdefault(kind, []).append(latencies[-1])
    elapsed = time.perf_counter() - started
    return {
        "requests": requests,
        "output_tokens": tokens,
        "elapsed_s": elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "e2e_p50_s": percentile(latencies, 50),
        "e2e_p95_s": percentile(latencies, 95),
        "ms_per_token": 1000 * elapsed / max(tokens, 1),
        "e2e_by_kind_s": {kind: statistics.median(values) for kind, values in by_kind.items()},
    }


# ---- Omnigate: engine + scheduler in-process ------------------------------------------------------


def make_engine(loaded, settings: WorkerSettings, model_id: str, metrics: WorkerMetrics):
    if "metrics" in inspect.signature(TransformersEngine).parameters:
        return TransformersEngine(loaded, settings, model_id, metrics=metrics)
    return TransformersEngine(loaded, settings, model_id)


def close_engine(engine, device: torch.device) -> None:
    close = getattr(engine, "close", None)
    if callable(close):
        close()
    release(device)


async def one_request(scheduler: Scheduler, request: GenerationRequest) -> dict:
    submitted = time.monotonic()
    first_text = None
    summary = None
    try:
        job = scheduler.submit(request)
        async for event in job.events():
            if isinstance(event, TextDelta) and first_text is None:
                first_text = time.monotonic()
            elif isinstance(event, Summary):
                summary = event
    except Exception as exc:  # noqa: BLE001 - counted and reported per level
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    ended = time.monotonic()
    first_token = getattr(job, "prefilled_at", None)  # the first token is picked as the row joins
    tokens = summary.output_tokens if summary is not None else 0
    out = {"e2e_s": ended - submitted, "tokens": tokens}
    if first_token is not None:
        out["ttft_s"] = first_token - submitted
        if tokens > 1:
            out["itl_mean_s"] = (ended - first_token) / (tokens - 1)
    elif summary is not None:  # ran alone (no batch row): the engine's own prefill time
        started = getattr(job, "started_at", None) or submitted
        out["ttft_s"] = started - submitted + summary.timings.prefill_s
    elif first_text is not None:
        out["ttft_s"] = first_text - submitted
    if summary is None:
        out["error"] = "the stream ended without a summary"
    return out


def summarize(results: list[dict], elapsed: float) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    e2e = [r["e2e_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if "ttft_s" in r]
    itl = [r["itl_mean_s"] for r in ok if "itl_mean_s" in r]
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p95_s": percentile(e2e, 95),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "itl_request_mean_p50_s": percentile(itl, 50),
        "itl_request_mean_p95_s": percentile(itl, 95),
    }


async def run_level(scheduler: Scheduler, requests: list[GenerationRequest], concurrency: int, total: int):
    counter = iter(range(total))
    results: list[dict] = []

    async def client() -> None:
        for i in counter:
            results.append(await one_request(scheduler, requests[i % len(requests)]))

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.monotonic() - started


def run_levels(
    scheduler, metrics: WorkerMetrics, requests, levels: list[int], per_level: int, out: list[dict], report
) -> list[dict]:
    """Each level into ``out`` as it ends (``report`` writes the files: a run cut short keeps them)."""
    for level in levels:
        total = per_level or max(len(requests), 2 * level)
        print(f"omnigate: concurrency {level}, {total} requests ...", flush=True)
        before = histogram(metrics.registry, ITL_METRIC).get(())
        results, elapsed = asyncio.run(run_level(scheduler, requests, level, total))
        itl = histogram_delta(histogram(metrics.registry, ITL_METRIC)[()], before)
        entry = {"concurrency": level, **summarize(results, elapsed)}
        entry["itl_p50_s"] = histogram_quantile(0.5, itl)
        entry["itl_p95_s"] = histogram_quantile(0.95, itl)
        entry["itl_observations"] = int(itl["count"])
        print(
            f"  {entry['output_tokens_per_s']:.1f} tokens/s, e2e p50 {entry['e2e_p50_s']:.3f} s, "
            f"errors {entry['errors']}",
            flush=True,
        )
        out.append(entry)
        report()
    return out


async def soak(scheduler, requests, concurrency: int, seconds: float, sample) -> tuple[list[dict], float]:
    """Closed-loop clients for ``seconds``; memory sampled at a third and at the end (under load)."""
    results: list[dict] = []
    started = time.monotonic()
    deadline = started + seconds

    async def client(offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            results.append(await one_request(scheduler, requests[i % len(requests)]))
            i += 1

    async def sampler() -> None:
        await asyncio.sleep(seconds / 3)
        sample("soak 1/3 (under load)")
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        sample("soak end (under load)")

    await asyncio.gather(sampler(), *(client(i) for i in range(concurrency)))
    return results, time.monotonic() - started


def decode_step_metric(metrics: WorkerMetrics, exclude: dict | None = None) -> dict:
    """Mean and median of the scheduler's decode-step histogram per batch-size bucket (levels + soak);
    ``exclude``: series to leave out (the speech section's steps, which include the talker's step)."""
    out = {}
    for labels, entry in histogram(metrics.registry, STEP_METRIC).items():
        if exclude and labels in exclude:
            entry = histogram_delta(entry, exclude[labels])
        if entry["count"]:
            batch = dict(labels).get("batch", "?")
            out[batch] = {
                "steps": int(entry["count"]),
                "mean_ms": 1000 * entry["sum"] / entry["count"],
                "p50_ms": 1000 * (histogram_quantile(0.5, entry) or 0.0),
            }
    return dict(sorted(out.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0))


# ---- speech: pipelined stages through the scheduler vs generate one request at a time ---------------


def speech_request(tokens: int, seed: int) -> GenerationRequest:
    """A short spoken answer of a fixed length: greedy thinker (min = max tokens); the talker samples
    (``talker_do_sample``) from the request's seed, so a run repeats."""
    return GenerationRequest(
        messages=[Message("user", [ContentPart(Modality.TEXT, text=SPEECH_PROMPT)])],
        params=GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens, seed=seed),
        mode=GenerationMode.AUDIO,
    )


def playback_underrun(chunks: list[tuple[float, float]]) -> float:
    """Seconds a client that starts playing at the first chunk's arrival and plays in real time waits for
    audio after that: ``chunks`` are (arrival s, duration s) in order."""
    underrun, play_end = 0.0, None
    for arrived, duration in chunks:
        if play_end is None:
            play_end = arrived + duration
            continue
        if arrived > play_end:
            underrun += arrived - play_end
        play_end = max(play_end, arrived) + duration
    return underrun


def speech_outcome(submitted: float, chunks: list[tuple[float, float]], summary, ended: float) -> dict:
    """One speech request's numbers from its chunks' (arrival time, seconds) and its summary."""
    audio = sum(duration for _, duration in chunks)
    out = {
        "e2e_s": ended - submitted,
        "chunks": len(chunks),
        "audio_s": audio,
        "tokens": summary.output_tokens if summary is not None else 0,
    }
    if summary is not None:
        out["summary_audio_s"] = summary.audio_seconds
    if chunks:
        out["ttfa_s"] = chunks[0][0] - submitted
        out["underrun_s"] = playback_underrun(chunks)
    if audio > 0:
        out["rtf"] = out["e2e_s"] / audio
    if summary is None:
        out["error"] = "the stream ended without a summary"
    elif not chunks or audio <= 0:
        out["error"] = "the speech request's stream carried no audio"
    return out


async def one_speech_request(scheduler: Scheduler, request: GenerationRequest, timeout_s: float) -> dict:
    """One speech request as a client sees it; a stream that has not ended after ``timeout_s`` is cancelled
    and counted as failed (a stalled stage must fail the run, not hang it)."""
    submitted = time.monotonic()
    chunks: list[tuple[float, float]] = []
    summary = None
    job = None
    try:
        job = scheduler.submit(request)
        async with asyncio.timeout(timeout_s):
            async for event in job.events():
                if isinstance(event, AudioChunk):
                    chunks.append((time.monotonic(), len(event.samples) / event.sample_rate))
                elif isinstance(event, Summary):
                    summary = event
    except TimeoutError:
        job.cancel()
        return {
            "error": f"the stream had not ended after {timeout_s:g} s ({len(chunks)} audio chunks by then)"
        }
    except Exception as exc:  # noqa: BLE001 - counted and reported per level
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return speech_outcome(submitted, chunks, summary, time.monotonic())


async def run_speech_level(scheduler: Scheduler, tokens: int, concurrency: int, total: int, timeout_s: float):
    """Closed-loop clients; request i has seed i (the one-at-a-time run repeats the first ones)."""
    counter = iter(range(total))
    results: list[dict] = []

    async def client() -> None:
        for i in counter:
            results.append(await one_speech_request(scheduler, speech_request(tokens, i), timeout_s))

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.monotonic() - started


def summarize_speech(results: list[dict], elapsed: float) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    audio = sum(r["audio_s"] for r in ok)
    rtf = [r["rtf"] for r in ok]
    underrun = [r["underrun_s"] for r in ok]
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "elapsed_s": elapsed,
        "output_tokens": sum(r["tokens"] for r in ok),
        "chunks": sum(r["chunks"] for r in ok),
        "audio_s": audio,
        "summary_audio_s": sum(r.get("summary_audio_s", 0.0) for r in ok),
        "audio_s_per_s": audio / elapsed if elapsed > 0 else None,
        "ttfa_p50_s": percentile([r["ttfa_s"] for r in ok], 50),
        "ttfa_p90_s": percentile([r["ttfa_s"] for r in ok], 90),
        "e2e_p50_s": percentile([r["e2e_s"] for r in ok], 50),
        "rtf_p50": percentile(rtf, 50),
        "rtf_p90": percentile(rtf, 90),
        "rtf_max": max(rtf) if rtf else None,
        "underrun_total_s": sum(underrun),
        "underrun_max_s": max(underrun) if underrun else None,
    }


def run_speech_one_at_a_time(engine, tokens: int, requests: int) -> dict:
    """Today's one-at-a-time path: ``engine.generate`` (transformers' generate with the talker streamer,
    vocoded on the same thread) for each request in turn, as the scheduler ran speech before the pipeline.
    The requests arrive together, so each one's time to first audio counts from the start of the run."""
    engine.generate(speech_request(4, 0), lambda event: None, threading.Event())  # warm-up
    results: list[dict] = []
    ttfa_from_start: list[float] = []
    started = time.monotonic()
    for i in range(requests):
        submitted = time.monotonic()
        chunks: list[tuple[float, float]] = []
        summaries: list[Summary] = []

        def emit(event, chunks=chunks, summaries=summaries) -> None:
            if isinstance(event, AudioChunk):
                chunks.append((time.monotonic(), len(event.samples) / event.sample_rate))
            elif isinstance(event, Summary):
                summaries.append(event)

        try:
            engine.generate(speech_request(tokens, i), emit, threading.Event())
        except Exception as exc:  # noqa: BLE001 - counted and reported
            results.append({"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        outcome = speech_outcome(submitted, chunks, summaries[-1] if summaries else None, time.monotonic())
        if chunks:
            ttfa_from_start.append(chunks[0][0] - started)
        results.append(outcome)
    entry = summarize_speech(results, time.monotonic() - started)
    entry["ttfa_own_p50_s"] = entry["ttfa_p50_s"]  # from each request's own start
    entry["ttfa_p50_s"] = percentile(ttfa_from_start, 50)
    entry["ttfa_p90_s"] = percentile(ttfa_from_start, 90)
    return entry


def run_speech(scheduler, engine, args, levels: list[int], out: dict, report) -> dict:
    """Speech at each concurrency level through the scheduler, then the same requests one at a time."""
    tokens = args.speech_tokens
    engine.validate(speech_request(tokens, 0))
    warm = max(levels)
    print(f"speech: warming up ({warm} requests of 4 tokens) ...", flush=True)
    results, _ = asyncio.run(run_speech_level(scheduler, 4, warm, warm, args.speech_timeout_s))
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise RuntimeError(f"speech warm-up failed: {failed[0]}")
    out["levels"] = []
    for level in levels:
        total = args.speech_requests_per_level or 2 * level
        print(f"speech: concurrency {level}, {total} requests of {tokens} tokens ...", flush=True)
        results, elapsed = asyncio.run(
            run_speech_level(scheduler, tokens, level, total, args.speech_timeout_s)
        )
        entry = {"concurrency": level, **summarize_speech(results, elapsed)}
        print(
            f"  {fmt(entry['audio_s_per_s'], digits=2)} audio s/s, TTFA p50 {fmt(entry['ttfa_p50_s'], digits=3)} s, "
            f"RTF max {fmt(entry['rtf_max'], digits=3)}, underrun {fmt(entry['underrun_total_s'], digits=3)} s, "
            f"errors {entry['errors']}",
            flush=True,
        )
        out["levels"].append(entry)
        report()
    level = max(levels)
    print(f"speech: the same {level} requests one at a time through engine.generate ...", flush=True)
    base = {"concurrency": level, **run_speech_one_at_a_time(engine, tokens, level)}
    out["one_at_a_time"] = base
    pipelined = next(lvl for lvl in out["levels"] if lvl["concurrency"] == level)
    if base["audio_s_per_s"] and pipelined["audio_s_per_s"]:
        out["throughput_ratio"] = {
            "level": level,
            "value": pipelined["audio_s_per_s"] / base["audio_s_per_s"],
        }
    print(
        f"  {fmt(base['audio_s_per_s'], digits=2)} audio s/s, TTFA p50 from the start "
        f"{fmt(base['ttfa_p50_s'], digits=3)} s, errors {base['errors']}",
        flush=True,
    )
    return out


def speech_conditions(args, settings: WorkerSettings, engine, levels: list[int]) -> dict:
    keys = (
        "stream_speech",
        "speech_chunk_codes",
        "speech_context_codes",
        "speech_lookahead_codes",
        "speech_max_streams",
        "talker_do_sample",
        "vocoder_steps",
        "vocoder_max_batch",
        "max_talker_tokens",
        "talker_tokens_per_text_token",
    )
    runner = getattr(engine.info, "decode_runner", "")
    return {
        # The engine turns the pipeline off (back to generate(), one request at a time) when its speech
        # warm-up fails; GetModelInfo's decode runner says which runs.
        "pipelined": "speech:" in runner,
        "decode_runner": runner,
        "levels": levels,
        "output_tokens": args.speech_tokens,
        "requests_per_level": args.speech_requests_per_level or "2 x concurrency",
        "prompt": SPEECH_PROMPT,
        "thinker": "greedy, min_new_tokens = max_new_tokens",
        "seeds": "request i of a level: seed i",
        "timeout_s": args.speech_timeout_s,
        "sample_rate": engine.info.output_audio_sample_rate,
        "settings": {key: getattr(settings, key) for key in keys if hasattr(settings, key)},
    }


# ---- decode step per batch size -------------------------------------------------------------------


def weight_bytes_per_step(model) -> int:
    """Parameter bytes one decode step reads: the text decoder (without its embedding table, of which a
    step reads one row per sequence) and the lm head."""
    gen = getattr(model, "thinker", model)
    decoder = gen.model
    embed = decoder.get_input_embeddings()
    head = gen.get_output_embeddings()

    def nbytes(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    return nbytes(decoder) - nbytes(embed) + nbytes(head)


def kv_bytes(model, batch: int, context: int, dtype: torch.dtype) -> int:
    gen = getattr(model, "thinker", model)
    config = getattr(gen.config, "text_config", gen.config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * batch * element


def time_steps(engine, device: torch.device, batch_size: int, steps: int, warm: int) -> dict:
    """Median wall time of ``batch.step()`` with ``batch_size`` text rows decoding."""
    tokens = warm + steps + 16
    batch = engine.open_batch()
    try:
        for _ in range(batch_size):
            engine.start_row(
                batch,
                engine.prepare(text_request(tokens)),
                lambda event: None,  # emit
                lambda error: None,  # done
                threading.Event(),  # cancelled
                None,  # deadline
            )
        for _ in range(warm):
            batch.step()
        times = []
        for _ in range(steps):
            sync(device)
            t = time.perf_counter()
            batch.step()
            sync(device)
            times.append(time.perf_counter() - t)
        rows = len(batch)
        context = int(getattr(batch, "length", 0) or 0)
    finally:
        batch.fail_all(RuntimeError("benchmark rows released"))
    return {
        "batch": batch_size,
        "rows": rows,
        "context": context,
        "median_ms": 1000 * statistics.median(times),
    }


def run_step_times(engine, loaded, batches: list[int], steps: int, bandwidth: float) -> list[dict]:
    weights = weight_bytes_per_step(loaded.model)
    out = []
    for size in batches:
        print(f"decode step: batch {size} ...", flush=True)
        entry = time_steps(engine, loaded.device, size, steps, warm=3)
        kv = kv_bytes(loaded.model, size, entry["context"], loaded.dtype)
        entry.update(
            weight_bytes=weights,
            kv_bytes=kv,
            floor_ms=1000 * (weights + kv) / bandwidth,
            target_ms=TARGETS["decode_step_ms"].get(size),
        )
        entry["over_floor"] = entry["median_ms"] / entry["floor_ms"]
        out.append(entry)
    return out


def run_sdpa(loaded, base: WorkerSettings, model_id: str, batches: list[int], steps: int) -> list[dict]:
    out = []
    for choice in SDPA_CHOICES:
        print(f"SDPA backends {choice!r} ...", flush=True)
        settings = base.model_copy(update={"sdpa_backends": choice})
        engine = make_engine(loaded, settings, model_id, WorkerMetrics(CollectorRegistry()))
        entry: dict = {"sdpa_backends": choice, "median_ms": {}}
        try:
            engine.warmup()
            for size in batches:
                entry["median_ms"][str(size)] = time_steps(engine, loaded.device, size, steps, warm=3)[
                    "median_ms"
                ]
        except Exception as exc:  # noqa: BLE001 - one backend failing does not hide the others
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        finally:
            close_engine(engine, loaded.device)
            del engine
            release(loaded.device)
        out.append(entry)
    return out


# ---- report ---------------------------------------------------------------------------------------


def growth_pct(first: dict, last: dict, key: str) -> float | None:
    if key not in first or key not in last or not first[key]:
        return None
    return 100.0 * (last[key] - first[key]) / first[key]


def fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def write_report(result: dict, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(result, indent=2))
    c = result["conditions"]
    lines = [
        f"# make bench-gpu: {c['model']} on {c['device_name']}",
        "",
        f"{c['dtype']}, {c['attn_implementation']} attention, {c['output_tokens']} output tokens per request "
        f"(min = max), mixed {'/'.join(KINDS)}; torch {c['torch']}, transformers {c['transformers']}, "
        f"commit {c['commit']}" + (" (partial run)" if result.get("partial") else ""),
    ]
    if c.get("engine"):
        lines += ["", "Engine: " + "; ".join(f"{key} {value}" for key, value in c["engine"].items())]
    base = result.get("baseline")
    if base:
        lines += [
            "",
            "## Baseline: transformers' generate, one request at a time",
            "",
            "| requests | tokens/s | ms/token | e2e p50 s | e2e p95 s |",
            "|---:|---:|---:|---:|---:|",
            f"| {base['requests']} | {fmt(base['output_tokens_per_s'])} | {fmt(base['ms_per_token'])} | "
            f"{fmt(base['e2e_p50_s'], digits=3)} | {fmt(base['e2e_p95_s'], digits=3)} |",
        ]
    if result.get("levels"):
        lines += [
            "",
            "## Omnigate engine + scheduler in-process, closed loop",
            "",
            "| concurrency | requests | errors | tokens/s | x baseline | e2e p50 s | e2e p95 s | TTFT p50 s | "
            "TTFT p95 s | ITL p50 ms | ITL p95 ms | ITL/request p50 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for lvl in result["levels"]:
            ratio = (
                lvl["output_tokens_per_s"] / base["output_tokens_per_s"]
                if base and lvl["output_tokens_per_s"]
                else None
            )
            lines.append(
                f"| {lvl['concurrency']} | {lvl['requests']} | {lvl['errors']} | {fmt(lvl['output_tokens_per_s'])} | "
                f"{fmt(ratio, digits=2)} | {fmt(lvl['e2e_p50_s'], digits=3)} | {fmt(lvl['e2e_p95_s'], digits=3)} | "
                f"{fmt(lvl['ttft_p50_s'], digits=3)} | {fmt(lvl['ttft_p95_s'], digits=3)} | "
                f"{fmt(lvl['itl_p50_s'], 1000)} | {fmt(lvl['itl_p95_s'], 1000)} | "
                f"{fmt(lvl['itl_request_mean_p50_s'], 1000)} |"
            )
        ratios = result.get("ratios", {})
        if ratios.get("throughput"):
            t = ratios["throughput"]
            lines.append(
                f"\n- throughput at concurrency {t['level']} / baseline = {fmt(t['value'], digits=2)}x "
                f"(target at 64: >= {TARGETS['throughput_ratio_at_64']:g}x)"
            )
        if ratios.get("latency_at_1") is not None:
            lines.append(
                f"- e2e latency p50 at concurrency 1 / baseline = {fmt(ratios['latency_at_1'], digits=2)}x "
                f"(target: <= {TARGETS['latency_ratio_at_1']:g}x)"
            )
        lines.append(
            "- TTFT: submit to the engine picking the first token; ITL: the worker's inter-token histogram "
            "(bucket-interpolated); ITL/request: (end - first token) / (tokens - 1)"
        )
    speech = result.get("speech")
    if isinstance(speech, dict) and speech.get("levels"):
        lines += ["", *speech_report(speech, c)]
    elif isinstance(speech, str):
        lines += ["", f"Speech: {speech}"]
    if result.get("decode_steps"):
        lines += [
            "",
            f"## Decode step per batch size (device copy bandwidth {fmt(result['copy_bandwidth_bytes_per_s'], 1e-9)} GB/s)",
            "",
            "| batch | context | step median ms | target ms | bytes read/step MB | floor ms | step/floor |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in result["decode_steps"]:
            lines.append(
                f"| {s['batch']} | {s['context']} | {fmt(s['median_ms'], digits=2)} | {fmt(s['target_ms'])} | "
                f"{fmt(s['weight_bytes'] + s['kv_bytes'], 1e-6)} | {fmt(s['floor_ms'], digits=3)} | "
                f"{fmt(s['over_floor'])} |"
            )
    metric = result.get("decode_step_metric")
    if metric:
        lines += [
            "",
            f"Scheduler runs (`{STEP_METRIC}`, levels and soak): "
            + ", ".join(
                f"batch<={batch}: {fmt(v['mean_ms'])} ms mean over {v['steps']} steps"
                for batch, v in metric.items()
            ),
        ]
    sdpa = result.get("sdpa")
    if isinstance(sdpa, list) and sdpa:
        lines += [
            "",
            "## Decode step by SDPA backends (median ms)",
            "",
            "| sdpa_backends | " + " | ".join(f"batch {b}" for b in SDPA_BATCHES) + " |",
            "|---|" + "---:|" * len(SDPA_BATCHES),
        ]
        for entry in sdpa:
            cells = [fmt(entry["median_ms"].get(str(b)), digits=2) for b in SDPA_BATCHES]
            lines.append(f"| {entry['sdpa_backends']} | " + " | ".join(cells) + " |")
            if entry.get("error"):
                lines.append(f"| (error: {entry['error'][:120]}) |" + " |" * len(SDPA_BATCHES))
    elif isinstance(sdpa, str):
        lines += ["", f"SDPA backends: {sdpa}"]
    memory = result.get("memory")
    if memory and memory.get("samples"):
        lines += [
            "",
            "## Memory",
            "",
            "| sample | t s | allocated MiB | max allocated MiB | RSS MiB |",
            "|---|---:|---:|---:|---:|",
        ]
        mib = 1 / (1 << 20)
        for s in memory["samples"]:
            lines.append(
                f"| {s['label']} | {s['t_s']:.1f} | {fmt(s.get('allocated_bytes'), mib, 0)} | "
                f"{fmt(s.get('max_allocated_bytes'), mib, 0)} | {fmt(s['rss_bytes'], mib, 0)} |"
            )
        lines.append(
            f"\n- growth of {memory['measure']} from 1/3 of the soak to its end: "
            f"{fmt(memory.get('growth_pct'), digits=2)} %, {fmt(memory.get('growth_bytes'), mib)} MiB "
            f"(target: within {TARGETS['memory_growth_pct']:g} %); from the first sample to the last: "
            f"{fmt(memory.get('growth_first_to_last_pct'), digits=2)} %, "
            f"{fmt(memory.get('growth_first_to_last_bytes'), mib)} MiB"
        )
        soak = memory.get("soak")
        if soak:
            lines.append(
                f"- soak: concurrency {soak['concurrency']} for {soak['elapsed_s']:.0f} s, {soak['requests']} "
                f"requests, {soak['errors']} errors, {fmt(soak['output_tokens_per_s'])} tokens/s"
            )
    if result.get("section_errors"):
        lines += ["", "## Sections that failed", ""]
        lines += [f"- {name}: {error}" for name, error in result["section_errors"].items()]
    table = "\n".join(lines)
    (out_dir / "gpu.md").write_text(table + "\n")
    return table


def speech_report(speech: dict, c: dict) -> list[str]:
    """The speech section's table, its conditions and issue 14's targets (marked pass/fail on CUDA only)."""
    sc, st = speech["conditions"], speech["conditions"]["settings"]
    lines = [
        "## Speech: pipelined thinker, talker and vocoder through the scheduler",
        "",
        f"{c['size']} on {c['device']} ({c['dtype']}); {sc['output_tokens']} reply tokens per request (greedy "
        f"thinker, min = max), talker {'sampled' if st.get('talker_do_sample') else 'greedy'} (seed per "
        f"request), up to {sc['output_tokens'] * st.get('talker_tokens_per_text_token', 0)} codes; chunks of "
        f"{st.get('speech_chunk_codes')} codes (doubling to 8x; {st.get('speech_context_codes')} context, "
        f"{st.get('speech_lookahead_codes')} look-ahead), vocoder {st.get('vocoder_steps')} steps, batch <= "
        f"{st.get('vocoder_max_batch')}, talker streams <= {st.get('speech_max_streams')}"
        + (
            ""
            if sc.get("pipelined")
            else ". THE SPEECH PIPELINE IS OFF: the levels ran generate() one request at a time"
        ),
        "",
        "| concurrency | requests | errors | audio s | audio s/s | TTFA p50 s | TTFA p90 s | RTF p50 | RTF max | "
        "underrun total s | underrun max s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name, lvl: dict) -> str:
        return (
            f"| {name} | {lvl['requests']} | {lvl['errors']} | {fmt(lvl['audio_s'], digits=2)} | "
            f"{fmt(lvl['audio_s_per_s'], digits=2)} | {fmt(lvl['ttfa_p50_s'], digits=3)} | "
            f"{fmt(lvl['ttfa_p90_s'], digits=3)} | {fmt(lvl['rtf_p50'], digits=3)} | {fmt(lvl['rtf_max'], digits=3)} | "
            f"{fmt(lvl['underrun_total_s'], digits=3)} | {fmt(lvl['underrun_max_s'], digits=3)} |"
        )

    for lvl in speech["levels"]:
        lines.append(row(lvl["concurrency"], lvl))
    base = speech.get("one_at_a_time")
    if base:
        lines.append(row(f"{base['concurrency']}, one at a time (generate)", base))
    lines += [
        "",
        "- TTFA: submit to the first audio chunk (one at a time: from the start of the run, as the requests "
        "queue); RTF: submit to the last event over the audio's seconds; underrun: a client playing from the "
        "first chunk in real time waits this long for later chunks",
    ]
    ratio = speech.get("throughput_ratio")
    if ratio:
        lines.append(
            f"- audio throughput at concurrency {ratio['level']} / one at a time = {fmt(ratio['value'], digits=2)}x"
        )
    lines.append("- targets (issue 14; GPU, 3B size, bf16): " + speech_targets(speech, c))
    return lines


def speech_targets(speech: dict, c: dict) -> str:
    """The targets next to the measured values; PASS/FAIL marks only on CUDA."""
    by_level = {lvl["concurrency"]: lvl for lvl in speech.get("levels") or []}
    t = SPEECH_TARGETS
    ratio = (speech.get("throughput_ratio") or {}).get("value") if 8 in by_level else None
    checks = [
        (
            f"TTFA p50 <= {t['ttfa_p50_s'][1]:g} s at 1",
            by_level.get(1, {}).get("ttfa_p50_s"),
            t["ttfa_p50_s"][1],
        ),
        (f"<= {t['ttfa_p50_s'][8]:g} s at 8", by_level.get(8, {}).get("ttfa_p50_s"), t["ttfa_p50_s"][8]),
        (f"RTF max <= {t['rtf_max_at_8']:g} at 8", by_level.get(8, {}).get("rtf_max"), t["rtf_max_at_8"]),
        (
            "underrun 0 s at 8",
            by_level.get(8, {}).get("underrun_total_s"),
            t["underrun_total_s_at_8"],
        ),
    ]
    cuda = c["device"].startswith("cuda")
    parts = []
    for name, value, limit in checks:
        mark = "" if not cuda or value is None else (" PASS" if value <= limit else " FAIL")
        parts.append(f"{name} ({fmt(value, digits=3)}{mark})")
    mark = "" if not cuda or ratio is None else (" PASS" if ratio >= t["throughput_ratio_at_8"] else " FAIL")
    parts.append(
        f"throughput at 8 >= {t['throughput_ratio_at_8']:g}x one at a time ({fmt(ratio, digits=2)}{mark})"
    )
    text = "; ".join(parts)
    if not cuda:
        return text + " (targets are for the GPU)"
    if c["size"] != "3b" or c["dtype"] != "bfloat16":
        return text + f" (the targets are for 3B bf16; this run is {c['size']} {c['dtype']})"
    return text


def commit() -> str:
    if os.environ.get("OMNIGATE_BENCH_COMMIT"):
        return os.environ["OMNIGATE_BENCH_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here; set OMNIGATE_BENCH_COMMIT)"


def conditions(args, loaded, model_id: str, settings: WorkerSettings) -> dict:
    import transformers

    device = loaded.device
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    worker = {
        key: getattr(settings, key)
        for key in (
            "max_batch_size",
            "max_queue",
            "preprocess_threads",
            "decode_runner",
            "sdpa_backends",
            "cuda_graphs",
        )
        if hasattr(settings, key)
    }
    return {
        "model": model_id,
        "size": args.size,
        "parameters": parameter_count(loaded.model),
        "device": str(device),
        "device_name": name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "attn_implementation": loaded.attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "levels": args.levels,
        "output_tokens": args.output_tokens,
        "step_batches": args.step_batches,
        "soak_seconds": args.soak_seconds,
        "kinds": list(KINDS),
        "worker_settings": worker,
        "commit": commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# ---- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "3b", "7b"), help="default: 3b on CUDA, tiny without")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:0")
    parser.add_argument("--levels", help=f"concurrency levels (default {FULL['levels']})")
    parser.add_argument(
        "--output-tokens", type=int, help=f"tokens per request (default {FULL['output_tokens']})"
    )
    parser.add_argument(
        "--soak-seconds", type=float, help=f"soak at concurrency 64 (default {FULL['soak_seconds']:g})"
    )
    parser.add_argument("--soak-concurrency", type=int, default=64)
    parser.add_argument("--step-batches", help=f"decode-step batch sizes (default {FULL['step_batches']})")
    parser.add_argument("--steps", type=int, help="decode steps timed per batch size (default 20)")
    parser.add_argument("--baseline-requests", type=int, help="baseline requests, kinds in turn (default 5)")
    parser.add_argument("--requests-per-level", type=int, help="0 (default) = max(5, 2 x concurrency)")
    parser.add_argument(
        "--speech-levels", help=f"speech concurrency levels (default {FULL['speech_levels']})"
    )
    parser.add_argument(
        "--speech-tokens", type=int, help=f"reply tokens per speech request (default {FULL['speech_tokens']})"
    )
    parser.add_argument(
        "--speech-requests-per-level",
        type=int,
        help="speech requests per level; 0 (default) = 2 x concurrency",
    )
    parser.add_argument(
        "--speech-timeout-s",
        type=float,
        help=f"a speech stream not ended after this long fails (default {FULL['speech_timeout_s']:g})",
    )
    parser.add_argument("--no-speech", action="store_true", help="skip the speech section")
    parser.add_argument("--max-batch-size", type=int, default=64, help="WorkerSettings.max_batch_size")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other WorkerSettings field, e.g. --set kv_slot_tokens=2048 (repeatable)",
    )
    parser.add_argument("--no-sdpa", action="store_true", help="skip the SDPA backend comparison")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--quick", action="store_true", help="the CPU smoke test's settings (levels 1,4; 8 tokens; ...)"
    )
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.size is None:
        args.size = "3b" if loading.resolve_device(args.device).type == "cuda" else "tiny"
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def worker_settings(args, model_id: str, device: torch.device, levels: list[int]) -> WorkerSettings:
    fields = WorkerSettings.model_fields
    values: dict = {
        "model": model_id,
        "device": str(device),
        "max_batch_size": args.max_batch_size,
        # Concurrency above the batch size waits in the queue rather than being refused.
        "max_queue": 2 * max(levels + [args.soak_concurrency]) + 16,
        "preprocess_threads": max(1, min(4, (os.cpu_count() or 2) // 4)),
    }
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {item}: WorkerSettings has no field {key!r}")
        values[key] = value
    return WorkerSettings(**{k: v for k, v in values.items() if k in fields})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:  # bench/gpu-device.sh's timeout (SIGINT), or Ctrl-C
        print(
            f"\nbench-gpu: interrupted; what was measured so far is in {args.out_dir / 'gpu.json'} "
            '("partial": true)',
            file=sys.stderr,
        )
        return 130


def run(args: argparse.Namespace) -> int:
    levels, batches = ints(args.levels), ints(args.step_batches)
    t0 = time.monotonic()
    print(f"bench-gpu: building the {args.size} model ...", flush=True)
    loaded, model_id = load_model(args.size, args.device)
    device = loaded.device
    sync(device)
    print(
        f"  {parameter_count(loaded.model) / 1e9:.3f} B parameters on {device} in {time.monotonic() - t0:.1f} s"
    )
    settings = worker_settings(args, model_id, device, levels)
    batches = [b for b in batches if b <= settings.max_batch_size]
    result: dict = {"partial": True, "conditions": conditions(args, loaded, model_id, settings)}
    section_errors: dict[str, str] = {}
    result["section_errors"] = section_errors
    media = make_media()
    requests = [build_request(kind, media, args.output_tokens) for kind in KINDS]

    def section(name: str, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported; the other sections still run
            traceback.print_exc()
            section_errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            return None
        finally:
            write_report(result, args.out_dir)

    print("measuring the device's copy bandwidth ...", flush=True)
    result["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device)  # before the KV-cache slots fill the GPU
    release(device)

    print("baseline: transformers generate, one request at a time ...", flush=True)
    result["baseline"] = section(
        "baseline", lambda: run_baseline(loaded, media, args.output_tokens, args.baseline_requests)
    )
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    metrics = WorkerMetrics(CollectorRegistry())
    engine = make_engine(loaded, settings, model_id, metrics)
    print("omnigate: warming up the engine ...", flush=True)
    engine.warmup()
    # What the engine chose (GetModelInfo's runner and attention kernels), where it says.
    result["conditions"]["engine"] = {
        key: getattr(engine.info, key) for key in ("decode_runner", "attention") if hasattr(engine.info, key)
    }
    for request in requests:
        engine.validate(request)
    scheduler = Scheduler(engine, settings, metrics)
    scheduler.start()
    speech_steps: dict = {}
    memory: dict = {"measure": "allocated_bytes" if device.type == "cuda" else "rss_bytes", "samples": []}
    result["memory"] = memory

    def sample(label: str) -> None:
        memory["samples"].append(memory_sample(label, device, t0))

    try:
        warm = [build_request(kind, media, 2) for kind in KINDS]
        section("warm-up", lambda: asyncio.run(run_level(scheduler, warm, len(warm), len(warm))))
        sample("start (after load and warm-up, idle)")
        result["levels"] = []
        section(
            "levels",
            lambda: run_levels(
                scheduler,
                metrics,
                requests,
                levels,
                args.requests_per_level,
                result["levels"],
                lambda: write_report(result, args.out_dir),
            ),
        )
        if args.no_speech:
            result["speech"] = "not measured (--no-speech)"
        elif Modality.AUDIO not in engine.info.output_modalities:
            result["speech"] = f"not measured: {model_id} has no speech output"
        else:
            speech_levels = ints(args.speech_levels)
            result["speech"] = {"conditions": speech_conditions(args, settings, engine, speech_levels)}
            steps_before = histogram(metrics.registry, STEP_METRIC)
            section(
                "speech",
                lambda: run_speech(
                    scheduler,
                    engine,
                    args,
                    speech_levels,
                    result["speech"],
                    lambda: write_report(result, args.out_dir),
                ),
            )
            speech_steps = {
                labels: histogram_delta(entry, steps_before.get(labels))
                for labels, entry in histogram(metrics.registry, STEP_METRIC).items()
            }
            release(device)
        print(f"soak: concurrency {args.soak_concurrency} for {args.soak_seconds:g} s ...", flush=True)
        soaked = section(
            "soak",
            lambda: asyncio.run(soak(scheduler, requests, args.soak_concurrency, args.soak_seconds, sample)),
        )
        if soaked is not None:
            memory["soak"] = {"concurrency": args.soak_concurrency, **summarize(*soaked)}
        release(device)
        sample("after the soak (idle)")
    finally:
        scheduler.shutdown()
    result["decode_step_metric"] = (
        decode_step_metric(metrics, exclude=speech_steps) if hasattr(metrics, "decode_step") else {}
    )
    samples, key = memory["samples"], memory["measure"]
    under_load = [s for s in samples if "under load" in s["label"]]
    if len(under_load) == 2:
        memory["growth_pct"] = growth_pct(under_load[0], under_load[1], key)
        memory["growth_bytes"] = under_load[1][key] - under_load[0][key]
    if samples:
        memory["growth_first_to_last_pct"] = growth_pct(samples[0], samples[-1], key)
        memory["growth_first_to_last_bytes"] = samples[-1][key] - samples[0][key]

    result["decode_steps"] = section(
        "decode steps",
        lambda: run_step_times(engine, loaded, batches, args.steps, result["copy_bandwidth_bytes_per_s"]),
    )
    # A speech request a stalled stage left unfinished fails as the engine closes (its client's event loop is
    # gone): reported with the section errors, and the run goes on.
    section("close engine", lambda: close_engine(engine, device))
    engine = scheduler = None  # the SDPA runs below build engines of their own
    release(device)

    if device.type != "cuda":
        result["sdpa"] = "not measured: the SDPA backend choice applies on CUDA only"
    elif args.no_sdpa or "sdpa_backends" not in WorkerSettings.model_fields:
        result["sdpa"] = "not measured (--no-sdpa, or WorkerSettings has no sdpa_backends)"
    else:
        sdpa_batches = [b for b in SDPA_BATCHES if b <= settings.max_batch_size]
        result["sdpa"] = section(
            "sdpa", lambda: run_sdpa(loaded, settings, model_id, sdpa_batches, args.steps)
        )

    by_level = {lvl["concurrency"]: lvl for lvl in result.get("levels") or []}
    base = result.get("baseline")
    ratios: dict = {}
    if base and by_level:
        level = 64 if 64 in by_level else max(by_level)
        ratios["throughput"] = {
            "level": level,
            "value": (by_level[level]["output_tokens_per_s"] or 0) / base["output_tokens_per_s"],
        }
        if 1 in by_level and by_level[1]["e2e_p50_s"]:
            ratios["latency_at_1"] = by_level[1]["e2e_p50_s"] / base["e2e_p50_s"]
    result["ratios"] = ratios
    result["targets"] = TARGETS
    result["partial"] = False
    print(write_report(result, args.out_dir))

    failed = {lvl["concurrency"]: lvl["errors"] for lvl in result.get("levels") or [] if lvl["errors"]}
    soak_errors = memory.get("soak", {}).get("errors", 0)
    speech = result.get("speech") if isinstance(result.get("speech"), dict) else {}
    speech_failed = {
        name: entry["errors"]
        for name, entry in [(f"concurrency {lvl['concurrency']}", lvl) for lvl in speech.get("levels") or []]
        + [("one at a time", speech.get("one_at_a_time") or {"errors": 0})]
        if entry["errors"]
    }
    if failed or soak_errors or speech_failed or section_errors:
        print(
            "\nbench-gpu: FAILED: "
            + "; ".join(
                [f"{n} request(s) failed at concurrency {c}" for c, n in failed.items()]
                + ([f"{soak_errors} request(s) failed in the soak"] if soak_errors else [])
                + [f"{n} speech request(s) failed at {name}" for name, n in speech_failed.items()]
                + [f"section {name} failed ({error})" for name, error in section_errors.items()]
            )
            + f". The numbers are in {args.out_dir / 'gpu.json'}.",
            file=sys.stderr,
        )
        return 1
    print(f"\nbench-gpu: wrote {args.out_dir / 'gpu.json'} and gpu.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
