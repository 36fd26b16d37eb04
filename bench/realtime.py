"""Realtime voice latency: from the end of the user's speech to the first audio byte at the client.

    python -m bench.realtime [--turns 10] [--max-output-tokens 16] [--model models/tiny-qwen2.5-omni]
                             [--out bench/results/realtime.json]

Starts a worker and a gateway as processes on loopback (the default tiny Qwen2.5-Omni unless ``--model``),
connects with the unmodified ``openai`` SDK (``client.realtime.connect``) with server VAD on, and for each
turn streams speech-like audio (tests/support/speech_like.py: 1.5 s of speech, then 1 s of silence) in
100 ms chunks at real-time pace, as a microphone would. It times, at the client:

- **commit to first audio:** ``input_audio_buffer.committed`` (the VAD's end of turn) to the first
  ``response.output_audio.delta``: the issue's number (the gateway answers on the commit);
- **speech end to first audio:** from the moment the client finished sending the speech (before the
  silence that ends the turn) to the first audio: what a user hears, the VAD's silence duration (500 ms)
  included;
- **barge-in:** in every second turn the client starts speaking again (0.3 s, real-time pace) once the
  first audio chunk arrived; the time from that speech's first chunk to ``response.done`` with status
  ``cancelled`` (the answer, and its worker call, stopped), next to the gateway's own
  ``omnigate_gateway_realtime_barge_in_seconds`` (speech detected to worker call cancelled).

Writes ``--out`` (JSON) and prints a table. It reports numbers; it never fails on them.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openai

from tests.support import speech_like
from tests.support.stack import MODELS_DIR, metric_sum, scrape_metrics, start_stack

REPO = Path(__file__).resolve().parents[1]
CHUNK_S = 0.1


class Events:
    """The connection's events as they arrive, each stamped with its arrival time by a reader thread (the
    main thread sends audio meanwhile, as a microphone would: the websockets connection under the SDK takes
    a send and a receive from two threads)."""

    def __init__(self, connection) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(connection,), daemon=True)
        self._thread.start()

    def _read(self, connection) -> None:
        try:
            for event in connection:
                self._queue.put((time.monotonic(), event))
        finally:
            self._queue.put((time.monotonic(), None))

    def next(self, kinds: set[str], timeout_s: float = 300):
        """The first event of one of ``kinds`` and its arrival time (events of other kinds are skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            at, event = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            if event is None:
                raise RuntimeError(f"the connection closed before {sorted(kinds)}")
            if event.type == "error":
                raise RuntimeError(f"error event: {event}")
            if event.type in kinds:
                return event, at


def _paced(connection, samples: np.ndarray) -> float:
    """Sends ``samples`` in CHUNK_S chunks at real-time pace; returns when the last one was sent."""
    start = time.monotonic()
    for i, chunk in enumerate(speech_like.chunks(speech_like.pcm16(samples), CHUNK_S)):
        delay = start + i * CHUNK_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        connection.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
    return time.monotonic()


def _turn(connection, events: Events, seed: int, barge_in: bool) -> dict:
    speech_end = _paced(connection, speech_like.speech(1.5, seed=seed))
    _paced(connection, speech_like.silence(1.0))
    _, committed_at = events.next({"input_audio_buffer.committed"})
    event, first_audio_at = events.next({"response.output_audio.delta", "response.done"})
    if event.type == "response.done":
        return {"audio": False, "status": event.response.status}
    turn = {
        "audio": True,
        "commit_to_first_audio_s": first_audio_at - committed_at,
        "speech_end_to_first_audio_s": first_audio_at - speech_end,
    }
    if barge_in:
        interrupted_at = time.monotonic()
        _paced(connection, speech_like.speech(0.3, seed=seed + 1000))
        done, done_at = events.next({"response.done"})
        turn["barge_in_status"] = done.response.status
        turn["barge_in_to_cancelled_s"] = done_at - interrupted_at
        # the interrupting speech is still in the buffer: end it and let its own answer run out
        _paced(connection, speech_like.silence(1.0))
        events.next({"response.done"})
    else:
        events.next({"response.done"})
    return turn


def _mean_histogram(samples: dict, name: str) -> float | None:
    count = metric_sum(samples, f"{name}_count")
    return round(metric_sum(samples, f"{name}_sum") / count, 6) if count else None


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(values),
        "p50_s": round(statistics.median(ordered), 4),
        "p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
        "max_s": round(ordered[-1], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-output-tokens", type=int, default=16)
    parser.add_argument("--model", type=Path, default=MODELS_DIR / "tiny-qwen2.5-omni")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "realtime.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as workdir:
        stack = start_stack(args.model, Path(workdir))
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.gateway.http_port}/v1", api_key="-")
            model = client.models.list().data[0].id
            turns = []
            with client.realtime.connect(model=model) as connection:
                events = Events(connection)
                events.next({"session.created"})
                connection.session.update(
                    session={"type": "realtime", "max_output_tokens": args.max_output_tokens}
                )
                events.next({"session.updated"})
                for i in range(args.turns):
                    turn = _turn(connection, events, seed=i, barge_in=i % 2 == 1)
                    turns.append(turn)
                    print(f"turn {i + 1}/{args.turns}: {json.dumps(turn)}", flush=True)
            samples = scrape_metrics(stack.gateway)
        finally:
            stack.gateway.stop()
            stack.worker.stop()

    spoken = [t for t in turns if t["audio"]]
    result = {
        "conditions": (
            f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU; "
            f"{args.model.name}; gateway and worker processes on loopback; openai SDK client in this process; "
            f"server VAD (threshold 0.5, 300 ms prefix, 500 ms silence); 1.5 s speech + 1 s silence per "
            f"turn, sent in {int(CHUNK_S * 1000)} ms chunks at real-time pace; up to {args.max_output_tokens} "
            "output tokens"
        ),
        "turns": len(turns),
        "turns_with_audio": len(spoken),
        "commit_to_first_audio": _summary([t["commit_to_first_audio_s"] for t in spoken]),
        "speech_end_to_first_audio": _summary([t["speech_end_to_first_audio_s"] for t in spoken]),
        "barge_in_to_cancelled": _summary(
            [t["barge_in_to_cancelled_s"] for t in spoken if t.get("barge_in_status") == "cancelled"]
        ),
        "barge_in_statuses": [t["barge_in_status"] for t in spoken if "barge_in_status" in t],
        "gateway_barge_in_detection_to_cancel_mean_s": _mean_histogram(
            samples, "omnigate_gateway_realtime_barge_in_seconds"
        ),
        "per_turn": turns,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['conditions']}\n")
    print("| measure | n | p50 s | p90 s | max s |\n|---|---:|---:|---:|---:|")
    for name in ("commit_to_first_audio", "speech_end_to_first_audio", "barge_in_to_cancelled"):
        s = result[name]
        print(
            f"| {name} | {s['n']} | {s.get('p50_s', '-')} | {s.get('p90_s', '-')} | {s.get('max_s', '-')} |"
        )
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
