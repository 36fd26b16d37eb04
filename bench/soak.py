"""Soak: a steady load across two workers while one of them is killed (SIGKILL) and restarted again and again.

    python -m bench.soak [--seconds 600] [--concurrency 32] [--kill-every 60] [--output bench/results/soak.json]

Starts two workers and a gateway as processes on loopback (the default tiny Qwen2.5-Omni), then keeps
``--concurrency`` Generate streams open (closed loop: each client sends its next request when one ends):
text prompts of a fixed random length, a third of them with a small inline image. Every ``--kill-every``
seconds worker 0 is killed with SIGKILL in the middle of its streams and started again on the same port.

Target: every request ends with success or a retriable status (UNAVAILABLE, or RESOURCE_EXHAUSTED with a
retry delay) within its deadline, the restarted worker takes requests again, and the resident memory of
the gateway and of the worker that is never killed grows by less than 10 % from the end of the warm-up (at
least ``--warmup`` seconds and the first kill and restart, so that the survivor has carried the whole load
alone once) to the end of the run. Writes the numbers to ``--output`` (bench/results/soak.json), prints a table, and exits
with status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from omnigate import status
from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from tests.support.stack import MODELS_DIR, PoolStack, metric_sum, scrape_metrics, start_pool_stack

REPO = Path(__file__).resolve().parents[1]

MODEL = MODELS_DIR / "tiny-qwen2.5-omni"
RESULTS = REPO / "bench" / "results"
MEMORY_GROWTH_LIMIT = 0.10
PROMPTS = [
    "Tell me a story about a lighthouse.",
    "What is the capital of France?",
    "Describe this picture.",
    "Write a haiku about the sea.",
]


@dataclass
class Outcome:
    started_s: float  # since the start of the run
    seconds: float
    status: str  # a gRPC status code name; RESOURCE_EXHAUSTED_RETRY when it carried a retry delay
    complete: bool  # OK with every requested token


def small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS from /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def client_loop(
    stub,
    image: bytes,
    deadline_s: float,
    stop_at: float,
    t0: float,
    outcomes: list[Outcome],
    rng: random.Random,
) -> None:
    while time.monotonic() < stop_at:
        tokens = rng.randint(16, 96)
        content = [pb.ContentPart(text=rng.choice(PROMPTS))]
        if rng.random() < 1 / 3:
            content.insert(0, pb.ContentPart(image=pb.MediaSource(inline=pb.InlineMedia(data=image))))
        request = pb.GenerateRequest(
            messages=[pb.Message(role="user", content=content)],
            parameters=pb.GenerationParameters(max_new_tokens=tokens, min_new_tokens=tokens),
            generation_mode=pb.GENERATION_MODE_TEXT,
        )
        started = time.monotonic()
        code, complete = "OK", False
        try:
            async for event in stub.Generate(request, timeout=deadline_s):
                if event.HasField("summary"):
                    complete = event.summary.output_tokens == tokens
        except grpc.RpcError as exc:
            code = exc.code().name
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and status.retry_after_s(exc) is not None:
                code = "RESOURCE_EXHAUSTED_RETRY"
        outcomes.append(Outcome(started - t0, time.monotonic() - started, code, complete))


def kill_and_restart(stack: PoolStack, index: int) -> tuple[float, float]:
    """SIGKILLs worker ``index`` and starts it again on its port; returns its OK count before the kill and
    the seconds until the gateway counted it ready again."""
    victim = stack.workers[index]
    served = metric_sum(scrape_metrics(victim), "omnigate_worker_requests_total", code="OK")
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=30)
    killed = time.monotonic()
    stack.restart_worker(index, wait=False)
    stack.wait_ready(len(stack.workers), timeout_s=180)
    return served, time.monotonic() - killed


async def soak(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="omnigate-soak-"))
    stack = start_pool_stack(MODEL, workdir, workers=2)
    try:
        return await _run(stack, args)
    finally:
        stack.stop()


async def _run(stack: PoolStack, args) -> dict:
    image = small_png()
    outcomes: list[Outcome] = []
    kills: list[dict] = []
    victim_served = 0.0
    t0 = time.monotonic()
    stop_at = t0 + args.seconds
    async with grpc.aio.insecure_channel(stack.gateway.target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        clients = [
            asyncio.create_task(
                client_loop(stub, image, args.deadline, stop_at, t0, outcomes, random.Random(1000 + i))
            )
            for i in range(args.concurrency)
        ]
        survivor = stack.workers[1]

        def memory() -> dict[str, float]:
            return {"gateway": rss_mb(stack.gateway.process.pid), "worker": rss_mb(survivor.process.pid)}

        # The memory baseline is taken after the warm-up and after the first kill and restart: the survivor
        # has then carried the whole load alone once, as it will again after every kill.
        memory_start = None
        next_kill = t0 + args.kill_every
        while next_kill < stop_at - 1:
            await asyncio.sleep(max(0.0, next_kill - time.monotonic()))
            at = time.monotonic() - t0
            failed_before = sum(o.status != "OK" for o in outcomes)
            served, back_after = await asyncio.to_thread(kill_and_restart, stack, 0)
            victim_served += served if kills else 0.0  # the first process is not a restarted one
            kills.append(
                {
                    "at_s": round(at, 1),
                    "worker": 0,
                    "back_ready_after_s": round(back_after, 1),
                    "failed_requests_since_previous": sum(o.status != "OK" for o in outcomes) - failed_before,
                }
            )
            print(f"  {at:6.1f} s  killed worker 0 (SIGKILL); back after {back_after:.1f} s", flush=True)
            if memory_start is None and time.monotonic() - t0 >= args.warmup:
                memory_start = memory()
            next_kill += args.kill_every
        if memory_start is None:  # no kill ended after the warm-up
            await asyncio.sleep(max(0.0, t0 + min(args.warmup, args.seconds) - time.monotonic()))
            memory_start = memory()
        await asyncio.gather(*clients)
        memory_end = memory()
        if kills:
            victim_served += metric_sum(
                scrape_metrics(stack.workers[0]), "omnigate_worker_requests_total", code="OK"
            )
    return summarize(args, outcomes, kills, victim_served, memory_start, memory_end)


def summarize(args, outcomes, kills, victim_served, memory_start, memory_end) -> dict:
    latencies = np.asarray([o.seconds for o in outcomes])
    longest = max(outcomes, key=lambda o: o.seconds)
    by_status = dict(sorted(Counter(o.status for o in outcomes).items()))
    allowed = {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED_RETRY"}
    slack_s = 1.0  # the client's timer vs the status arriving
    bad = [o for o in outcomes if o.status not in allowed or o.seconds > args.deadline + slack_s]
    incomplete = sum(o.status == "OK" and not o.complete for o in outcomes)
    memory = {
        name: {
            "start_mb": round(memory_start[name], 1),
            "end_mb": round(memory_end[name], 1),
            "growth": round(memory_end[name] / memory_start[name] - 1, 4),
        }
        for name in memory_start
    }
    targets = {
        "every_request_ok_or_retriable_within_deadline": not bad and not incomplete,
        "restarted_worker_took_requests": not kills or victim_served > 0,
        "memory_growth_under_10_percent": all(m["growth"] < MEMORY_GROWTH_LIMIT for m in memory.values()),
    }
    return {
        "config": {
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "kill_every_s": args.kill_every,
            "deadline_s": args.deadline,
            "warmup_s": args.warmup,
            "workers": 2,
            "model": str(MODEL.relative_to(REPO)),
            "machine": f"{platform.machine()}, {platform.python_version()}",
        },
        "requests": {
            "total": len(outcomes),
            "by_status": by_status,
            "ok_but_incomplete": incomplete,
            "outside_target": len(bad),
        },
        "latency_s": {
            "p50": round(float(np.percentile(latencies, 50)), 3),
            "p95": round(float(np.percentile(latencies, 95)), 3),
            "p99": round(float(np.percentile(latencies, 99)), 3),
        },
        "longest_request": {
            "seconds": round(longest.seconds, 3),
            "status": longest.status,
            "started_at_s": round(longest.started_s, 1),
        },
        "kills": kills,
        "restarted_worker_ok_requests": int(victim_served),
        "memory": memory,
        "targets": targets,
        "passed": all(targets.values()),
    }


def print_table(result: dict) -> None:
    r = result
    print()
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| requests | {r['requests']['total']} ({', '.join(f'{k} {v}' for k, v in r['requests']['by_status'].items())}) |"
    )
    print(
        f"| latency p50 / p95 / p99 | {r['latency_s']['p50']} / {r['latency_s']['p95']} / {r['latency_s']['p99']} s |"
    )
    print(f"| longest request | {r['longest_request']['seconds']} s ({r['longest_request']['status']}) |")
    print(
        f"| worker kills | {len(r['kills'])}; the restarted worker served {r['restarted_worker_ok_requests']} requests |"
    )
    for name, m in r["memory"].items():
        print(
            f"| {name} RSS after warm-up → end | {m['start_mb']} → {m['end_mb']} MiB ({m['growth']:+.1%}) |"
        )
    for name, ok in r["targets"].items():
        print(f"| target: {name.replace('_', ' ')} | {'met' if ok else 'MISSED'} |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600, help="length of the run")
    parser.add_argument("--concurrency", type=int, default=32, help="streams kept open")
    parser.add_argument("--kill-every", type=float, default=60, help="seconds between kills of worker 0")
    parser.add_argument(
        "--warmup", type=float, default=20, help="seconds before the memory baseline is taken"
    )
    parser.add_argument("--deadline", type=float, default=30, help="deadline of each request, seconds")
    parser.add_argument("--output", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    if not (MODEL / "config.json").exists():
        sys.exit(f"{MODEL} is missing: run `make models`")
    print(
        f"soak: {args.seconds:.0f} s at concurrency {args.concurrency}, worker 0 killed every "
        f"{args.kill_every:.0f} s",
        flush=True,
    )
    result = asyncio.run(soak(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {args.output}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
