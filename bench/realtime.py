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
- **barge-in:** in half of the turns the client starts speaking again after the first audio chunk; the
  time from that speech's first chunk to ``response.done`` with status ``cancelled`` (the answer, and its
  worker call, stopped), next to the gateway's own ``omnigate_gateway_realtime_barge_in_seconds``.

Writes ``--out`` (JSON) and prints a table. It reports numbers; it never fails on them.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import openai

from tests.support import speech_like
from tests.support.stack import MODELS_DIR, start_stack

REPO = Path(__file__).resolve().parents[1]
CHUNK_S = 0.1


def _paced(connection, samples: np.ndarray) -> float:
    """Sends ``samples`` in CHUNK_S chunks at real-time pace; returns when the last one was sent."""
    start = time.monotonic()
    for i, chunk in enumerate(speech_like.chunks(speech_like.pcm16(samples), CHUNK_S)):
        delay = start + i * CHUNK_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        connection.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
    return time.monotonic()


def _next(connection, kinds: set[str], timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    for event in connection:
        if event.type == "error":
            raise RuntimeError(f"error event: {event}")
        if event.type in kinds:
            return event, time.monotonic()
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"no {sorted(kinds)} within {timeout_s} s")


def _turn(connection, seed: int, barge_in: bool) -> dict:
    speech = speech_like.speech(1.5, seed=seed)
    speech_end = _paced(connection, speech)
    _paced(connection, speech_like.silence(1.0))
    _, committed_at = _next(connection, {"input_audio_buffer.committed"})
    event, first_audio_at = _next(connection, {"response.output_audio.delta", "response.done"})
    if event.type == "response.done":
        return {"audio": False, "status": event.response.status}
    turn = {
        "audio": True,
        "commit_to_first_audio_s": first_audio_at - committed_at,
        "speech_end_to_first_audio_s": first_audio_at - speech_end,
    }
    if barge_in:
        interrupted_at = time.monotonic()
        connection.input_audio_buffer.append(
            audio=base64.b64encode(speech_like.pcm16(speech_like.speech(0.3, seed=seed + 1000))).decode()
        )
        done, done_at = _next(connection, {"response.done"})
        turn["barge_in_status"] = done.response.status
        turn["barge_in_to_cancelled_s"] = done_at - interrupted_at
        # the interrupting speech stays in the buffer: clear it so the next turn starts clean
        _paced(connection, speech_like.silence(1.0))
        connection.input_audio_buffer.clear()
        _drain(connection, 1.0)
    else:
        _next(connection, {"response.done"})
    return turn


def _drain(connection, seconds: float) -> None:
    """Reads what arrives for ``seconds`` (the answer to an interrupting fragment, cleared events)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            connection.recv()  # the SDK's recv blocks; the stream is short-lived here
        except Exception:  # noqa: BLE001 - a closed or quiet connection ends the drain
            return
        if time.monotonic() >= end:
            return


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
                _next(connection, {"session.created"})
                connection.session.update(
                    session={"type": "realtime", "max_output_tokens": args.max_output_tokens}
                )
                _next(connection, {"session.updated"})
                for i in range(args.turns):
                    turn = _turn(connection, seed=i, barge_in=i % 2 == 1)
                    turns.append(turn)
                    print(f"turn {i + 1}/{args.turns}: {json.dumps(turn)}", flush=True)
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
        "per_turn": turns,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['conditions']}\n")
    print("| measure | n | p50 s | p90 s | max s |\n|---|---:|---:|---:|---:|")
    for name in ("commit_to_first_audio", "speech_end_to_first_audio", "barge_in_to_cancelled"):
        s = result[name]
        print(f"| {name} | {s['n']} | {s.get('p50_s', '-')} | {s.get('p90_s', '-')} | {s.get('max_s', '-')} |")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
