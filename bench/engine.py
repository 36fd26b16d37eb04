"""Throughput and latency: transformers' pipeline in-process vs the full Omnigate stack.

    python -m bench.engine [--requests-per-level N] [--output-tokens N] [--levels 1,4,16,32]

- Baseline: the guide's way, ``pipeline("any-to-any")`` in this process, one request at a time, on media
  already decoded (so the baseline pays no fetching or decoding; Omnigate does).
- Omnigate: a worker and a gateway as separate processes on loopback; clients stream ``Generate`` over
  gRPC at each concurrency level (closed loop), with media fetched by the gateway from a local HTTP server.
- Both run the same mixed request set (text only; text+image; text+audio; text+video at fps=1), greedy,
  with a fixed output length (min_new_tokens = max_new_tokens), on the default tiny Qwen2.5-Omni.

Writes bench/results/engine.json, engine.md and engine.png, and prints the table. It reports numbers; it
never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from omnigate.media import DecodeLimits
from tests.support import media_factory
from tests.support.media_server import MediaServer
from tests.support.stack import MODELS_DIR, start_stack

REPO = Path(__file__).resolve().parents[1]

MODEL = MODELS_DIR / "tiny-qwen2.5-omni"
RESULTS = REPO / "bench" / "results"
KINDS = ["text", "image", "audio", "video"]
PROMPTS = {
    "text": "Tell me a story about a lighthouse.",
    "image": "Describe this image.",
    "audio": "What do you hear in this audio?",
    "video": "Describe this video.",
}


def make_media() -> dict[str, bytes]:
    return {
        "image": media_factory.make_jpeg(160, 120),
        "audio": media_factory.make_mp3(seconds=3.0, rate=44100, channels=2, freq=330.0),
        "video": media_factory.make_mp4(seconds=4.0, fps=10, w=96, h=64, with_audio=True),
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# ---- baseline -------------------------------------------------------------------------------------


def run_baseline(media: dict[str, bytes], requests: int, output_tokens: int) -> dict:
    import PIL.Image
    from transformers import pipeline

    from omnigate_gateway.media.audio import decode_audio
    from omnigate_gateway.media.image import decode_image
    from omnigate_gateway.media.video import decode_video

    pipe = pipeline("any-to-any", model=str(MODEL))
    limits = DecodeLimits()
    image = PIL.Image.fromarray(decode_image(media["image"], limits).pixels)
    audio = decode_audio(media["audio"], 16000, limits).samples
    video = decode_video(media["video"], 1.0, False, 16000, limits).frames
    generate = {
        "generation_mode": "text",
        "thinker_max_new_tokens": output_tokens,
        "thinker_min_new_tokens": output_tokens,
        "thinker_do_sample": False,
    }
    video_kwargs = {"fps": 1.0, "do_sample_frames": False, "size": dict(pipe.processor.video_processor.size)}
    parts = {
        "text": [],
        "image": [{"type": "image", "image": image}],
        "audio": [{"type": "audio", "audio": audio}],
        "video": [{"type": "video", "video": video}],
    }

    def one(kind: str) -> None:
        messages = [{"role": "user", "content": parts[kind] + [{"type": "text", "text": PROMPTS[kind]}]}]
        kwargs = {"processor_kwargs": video_kwargs} if kind == "video" else {}
        pipe(text=messages, return_full_text=False, generate_kwargs=dict(generate), **kwargs)

    for kind in KINDS:  # warm-up
        one(kind)
    latencies = []
    started = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        one(KINDS[i % len(KINDS)])
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - started
    return {
        "requests": requests,
        "rps": requests / total,
        "e2e_p50_s": percentile(latencies, 50),
        "e2e_p95_s": percentile(latencies, 95),
        "output_tokens_per_s": requests * output_tokens / total,
    }


# ---- Omnigate -------------------------------------------------------------------------------------


def build_requests(urls: dict[str, str], output_tokens: int) -> dict[str, pb.GenerateRequest]:
    out = {}
    for kind in KINDS:
        content = []
        if kind != "text":
            content.append(pb.ContentPart(**{kind: pb.MediaSource(url=urls[kind])}))
        content.append(pb.ContentPart(text=PROMPTS[kind]))
        out[kind] = pb.GenerateRequest(
            messages=[pb.Message(role="user", content=content)],
            parameters=pb.GenerationParameters(max_new_tokens=output_tokens, min_new_tokens=output_tokens),
            generation_mode=pb.GENERATION_MODE_TEXT,
            video=pb.VideoOptions(fps=1.0),
        )
    return out


async def run_level(target: str, requests: dict, concurrency: int, total: int) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        counter = iter(range(total))
        ttfts, e2es, tokens, failures = [], [], [], []

        async def client() -> None:
            for i in counter:
                request = requests[KINDS[i % len(KINDS)]]
                started = time.perf_counter()
                first = None
                try:
                    async for event in stub.Generate(request, timeout=300):
                        kind = event.WhichOneof("event")
                        if first is None and kind == "text":
                            first = time.perf_counter() - started
                        if kind == "summary":
                            tokens.append(event.summary.output_tokens)
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc.code().name)
                    continue
                e2es.append(time.perf_counter() - started)
                ttfts.append(first if first is not None else e2es[-1])

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(e2es),
        "failures": len(failures),
        "rps": len(e2es) / elapsed,
        "output_tokens_per_s": sum(tokens) / elapsed,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "e2e_p50_s": percentile(e2es, 50),
        "e2e_p95_s": percentile(e2es, 95),
    }


async def run_speech(target: str, url: str, runs: int) -> dict:
    """Time to first audio chunk and real-time factor for speech answers (video with its audio track)."""
    request = pb.GenerateRequest(
        messages=[
            pb.Message(
                role="user",
                content=[
                    pb.ContentPart(video=pb.MediaSource(url=url)),
                    pb.ContentPart(text="Describe this video."),
                ],
            )
        ],
        parameters=pb.GenerationParameters(max_new_tokens=16, min_new_tokens=16),
        generation_mode=pb.GENERATION_MODE_AUDIO,
        video=pb.VideoOptions(fps=1.0, load_audio_from_video=True),
    )
    ttfa, rtf = [], []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for _ in range(runs):
            started = time.perf_counter()
            first = None
            async for event in stub.Generate(request, timeout=300):
                if first is None and event.WhichOneof("event") == "audio":
                    first = time.perf_counter() - started
                if event.WhichOneof("event") == "summary":
                    total = time.perf_counter() - started
                    rtf.append(total / max(event.summary.audio_seconds, 1e-9))
            ttfa.append(first)
    return {"runs": runs, "ttfa_p50_s": percentile(ttfa, 50), "rtf_p50": percentile(rtf, 50)}


# ---- report ---------------------------------------------------------------------------------------


def write_report(result: dict) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Baseline (pipeline in-process, sequential): {result['baseline_rps']:.2f} req/s, "
        f"e2e p50 {result['baseline']['e2e_p50_s'] * 1000:.1f} ms",
        "",
        "| concurrency | req/s | tokens/s | TTFT p50 ms | TTFT p95 ms | e2e p50 ms | e2e p95 ms | failures |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in result["levels"]:
        lines.append(
            f"| {level['concurrency']} | {level['rps']:.2f} | {level['output_tokens_per_s']:.0f} | "
            f"{level['ttft_p50_s'] * 1000:.1f} | {level['ttft_p95_s'] * 1000:.1f} | {level['e2e_p50_s'] * 1000:.1f} | "
            f"{level['e2e_p95_s'] * 1000:.1f} | {level['failures']} |"
        )
    lines += [
        "",
        f"- throughput_ratio_c16 = {result['throughput_ratio_c16']:.2f} (target >= 5)",
        f"- overhead_ratio_c1 = {result['overhead_ratio_c1']:.2f} (target <= 1.15)",
        f"- ttft_p95_c16 / ttft_p50_c1 = {result['ttft_spread_c16']:.2f} (target <= 3)",
        f"- speech: time to first audio p50 {result['speech']['ttfa_p50_s'] * 1000:.0f} ms, "
        f"real-time factor p50 {result['speech']['rtf_p50']:.2f}",
        f"- conditions: {result['conditions']}",
    ]
    table = "\n".join(lines)
    (RESULTS / "engine.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        levels = [lvl["concurrency"] for lvl in result["levels"]]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(levels, [lvl["rps"] for lvl in result["levels"]], "o-", label="Omnigate")
        left.axhline(result["baseline_rps"], color="gray", linestyle="--", label="pipeline (sequential)")
        left.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="Throughput")
        left.set_xticks(levels, [str(x) for x in levels])
        left.legend()
        for key, label in (
            ("ttft_p50_s", "TTFT p50"),
            ("ttft_p95_s", "TTFT p95"),
            ("e2e_p50_s", "e2e p50"),
            ("e2e_p95_s", "e2e p95"),
        ):
            right.plot(levels, [lvl[key] * 1000 for lvl in result["levels"]], "o-", label=label)
        right.axhline(
            result["baseline"]["e2e_p50_s"] * 1000, color="gray", linestyle="--", label="pipeline e2e p50"
        )
        right.set(xscale="log", xlabel="concurrency", ylabel="ms", title="Latency")
        right.set_xticks(levels, [str(x) for x in levels])
        right.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "engine.png", dpi=100)
    except ImportError:
        table += "\n(matplotlib missing: no plot)"
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,16,32")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--baseline-requests", type=int, default=40)
    parser.add_argument("--requests-per-level", type=int, default=0, help="0 = max(40, 6 x concurrency)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    media = make_media()
    print("baseline: pipeline in-process ...", flush=True)
    baseline = run_baseline(media, args.baseline_requests, args.output_tokens)

    server = MediaServer({})
    server.start()
    urls = {kind: server.serve(f"/bench/{kind}", data) for kind, data in media.items()}
    workdir = Path(tempfile.mkdtemp(prefix="omnigate-bench-"))
    stack = start_stack(MODEL, workdir)
    try:
        requests = build_requests(urls, args.output_tokens)
        asyncio.run(run_level(stack.gateway.target, requests, 4, 8))  # warm-up
        results = []
        for level in levels:
            total = args.requests_per_level or max(40, 6 * level)
            print(f"omnigate: concurrency {level}, {total} requests ...", flush=True)
            results.append(asyncio.run(run_level(stack.gateway.target, requests, level, total)))
        speech = asyncio.run(run_speech(stack.gateway.target, urls["video"], 5))
    finally:
        stack.gateway.stop()
        stack.worker.stop()
        server.stop()

    by_level = {lvl["concurrency"]: lvl for lvl in results}
    c1, c16 = by_level.get(1), by_level.get(16)
    result = {
        "baseline_rps": baseline["rps"],
        "baseline": baseline,
        "levels": results,
        "throughput_ratio_c16": c16["rps"] / baseline["rps"] if c16 else None,
        "overhead_ratio_c1": c1["e2e_p50_s"] / baseline["e2e_p50_s"] if c1 else None,
        "ttft_spread_c16": c16["ttft_p95_s"] / c1["ttft_p50_s"] if c1 and c16 else None,
        "speech": speech,
        "conditions": (
            f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU; model "
            f"{MODEL.name} fp32; mixed set text/image/audio/video(fps=1), greedy, {args.output_tokens} output "
            "tokens each; gateway, worker and load generator share the machine"
        ),
    }
    print(write_report(result))


if __name__ == "__main__":
    main()
