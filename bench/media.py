"""Media decoding: Omnigate's decoders against transformers' own loaders, on the same files.

    python -m bench.media [--repeats N] [--quick]      (or: make bench-media)

Compares, per file, Omnigate's ``decode_audio`` / ``decode_image`` / ``decode_video`` with
``transformers.audio_utils.load_audio``, ``transformers.image_utils.load_image`` and
``transformers.video_utils.load_video(backend="pyav")``, producing the same thing (mono float32 audio at
16 kHz; an RGB array; RGB frames sampled at fps=2). Both start from the file on disk (Omnigate's time
includes reading it). Times are the median of ``--repeats`` runs after one warm-up run, both loaders
taking turns in one process so that other load on the machine weighs on both alike. Peak memory is
measured for each loader in a fresh process: the resident memory one run adds at its peak (VmHWM after
a reset through /proc/self/clear_refs, minus the resident size after imports and a warm-up run).

The test files are generated (deterministically) into bench/results/media-corpus/ and kept for later
runs; the main case is a 60 s 1280x720 H.264 clip (x264 "veryfast", B-frames) with an AAC track.
Results go to bench/results/media.json and a table on stdout. Never fails on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CORPUS = RESULTS / "media-corpus"
AUDIO_RATE = 16000
VIDEO_FPS = 2.0

# name: (kind, file, Omnigate options, transformers can load it, note)
CASES = {
    "audio wav 60s 44.1k stereo": ("audio", "speech-60s.wav", {}, True, ""),
    "audio flac 60s 44.1k stereo": ("audio", "speech-60s.flac", {}, True, ""),
    "audio mp3 60s 44.1k stereo": ("audio", "speech-60s.mp3", {}, True, ""),
    "audio ogg-vorbis 60s 44.1k": ("audio", "speech-60s.ogg", {}, True, ""),
    "image jpeg 4032x3024": ("image", "photo-12mp.jpg", {}, True, ""),
    "image png 1920x1080": ("image", "screen-1080p.png", {}, True, ""),
    "image webp 1920x1080": ("image", "screen-1080p.webp", {}, True, ""),
    "video mp4 h264 720p 60s @2fps": ("video", "clip-720p-60s.mp4", {"load_audio": False}, True, ""),
    "video mp4 h264 720p 60s @2fps + audio track": (
        "video",
        "clip-720p-60s.mp4",
        {"load_audio": True},
        False,
        "Omnigate also decodes and resamples the AAC track; transformers' loader has no audio-track option",
    ),
}


# ------------------------------------------------------------------------------------------ test files


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    left = 0.4 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    right = 0.3 * np.sin(2 * np.pi * 330 * t + 0.3)
    noise = np.random.default_rng(0).normal(0, 0.02, size=(len(t), 2))
    return (np.stack([left, right], axis=1) + noise).astype(np.float32)


def _picture(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack(
        [(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), ((xx // 64 + yy // 64) % 2) * 180 + 40],
        axis=2,
    )
    noise = np.random.default_rng(1).integers(0, 24, size=rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def make_corpus() -> None:
    import av
    import soundfile as sf
    from PIL import Image

    CORPUS.mkdir(parents=True, exist_ok=True)
    samples = None
    for name, fmt, subtype in (
        ("speech-60s.wav", "WAV", "PCM_16"),
        ("speech-60s.flac", "FLAC", "PCM_16"),
        ("speech-60s.mp3", "MP3", "MPEG_LAYER_III"),
        ("speech-60s.ogg", "OGG", "VORBIS"),
    ):
        if not (CORPUS / name).exists():
            samples = _tone(60.0, 44100) if samples is None else samples
            # In blocks: libsndfile's Vorbis encoder crashes on a minute of audio written in one call.
            with sf.SoundFile(CORPUS / name, "w", 44100, 2, format=fmt, subtype=subtype) as out:
                for start in range(0, len(samples), 8192):
                    out.write(samples[start : start + 8192])
    for name, (w, h), fmt, args in (
        ("photo-12mp.jpg", (4032, 3024), "JPEG", {"quality": 90}),
        ("screen-1080p.png", (1920, 1080), "PNG", {}),
        ("screen-1080p.webp", (1920, 1080), "WEBP", {"quality": 90}),
    ):
        if not (CORPUS / name).exists():
            Image.fromarray(_picture(w, h)).save(CORPUS / name, format=fmt, **args)
    clip = CORPUS / "clip-720p-60s.mp4"
    if not clip.exists():
        print("writing the 60 s 720p test clip (about a minute, once)...", flush=True)
        _write_clip(av, clip, seconds=60, fps=30, w=1280, h=720)


def _write_clip(av, path: Path, seconds: int, fps: int, w: int, h: int) -> None:
    base = _picture(w, h)
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        video.codec_context.thread_type = "AUTO"
        audio = out.add_stream("aac", rate=44100)
        audio.codec_context.layout = "stereo"
        for i in range(seconds * fps):
            frame = np.roll(base, (2 * i, 3 * i), axis=(0, 1))  # panning motion
            frame[40:120, (5 * i) % (w - 80) : (5 * i) % (w - 80) + 80] = (255, 255, 255)  # a moving block
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, fps)
            for packet in video.encode(vf):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        samples = _tone(float(seconds), 44100)
        for start in range(0, len(samples), 1024):
            block = np.ascontiguousarray(samples[start : start + 1024].T)
            af = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
            af.sample_rate, af.pts, af.time_base = 44100, start, Fraction(1, 44100)
            for packet in audio.encode(af):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    tmp.rename(path)


# ------------------------------------------------------------------------------------- one measurement


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _loader(case: str, loader: str):
    """A function producing the case's output with ``loader`` ("omnigate" or "transformers")."""
    kind, file, options, _, _ = CASES[case]
    path = str(CORPUS / file)
    if loader == "omnigate":
        from omnigate.media import DecodeLimits
        from omnigate_gateway.media.audio import decode_audio
        from omnigate_gateway.media.image import decode_image
        from omnigate_gateway.media.video import decode_video

        limits = DecodeLimits()

        def run():
            data = Path(path).read_bytes()
            if kind == "audio":
                return decode_audio(data, AUDIO_RATE, limits).samples
            if kind == "image":
                return decode_image(data, limits).pixels
            return decode_video(data, VIDEO_FPS, options["load_audio"], AUDIO_RATE, limits).frames

        return run
    from transformers.audio_utils import load_audio
    from transformers.image_utils import load_image
    from transformers.video_utils import load_video

    def run():
        if kind == "audio":
            return load_audio(path, sampling_rate=AUDIO_RATE, backend="soundfile")
        if kind == "image":
            return np.asarray(load_image(path))  # the same product as Omnigate's: an RGB array
        return load_video(path, fps=VIDEO_FPS, backend="pyav")[0]

    return run


def measure_time(case: str, loaders: list[str], repeats: int) -> dict:
    """In one process, the loaders take turns (the order alternating), so that whatever else the
    machine is doing weighs on both alike; one warm-up run each first."""
    runs = {name: _loader(case, name) for name in loaders}
    shapes = {}
    for name, run in runs.items():
        shapes[name] = list(np.shape(run()))
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(repeats):
        for name in loaders if r % 2 == 0 else loaders[::-1]:
            started = time.perf_counter()
            output = runs[name]()
            times[name].append(time.perf_counter() - started)
            del output
    return {
        name: {"seconds": statistics.median(t), "all_seconds": t, "shape": shapes[name]}
        for name, t in times.items()
    }


def measure_memory(case: str, loader: str) -> dict:
    """In a fresh process: the peak resident memory one run adds (after imports and a warm-up run)."""
    run = _loader(case, loader)
    output = run()
    del output
    baseline = _rss_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    except OSError:
        return {"peak_bytes": None}
    output = run()
    peak = _rss_bytes("VmHWM") - baseline
    del output
    return {"peak_bytes": peak}


def _child(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, timeout=1200
    )
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout or "failed").strip().splitlines()[-1][:300]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case and loader (median)")
    parser.add_argument("--quick", action="store_true", help="one timed run per case (smoke test)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, case, *rest = args.child
        if what == "time":
            print(json.dumps(measure_time(case, rest[1:], int(rest[0]))))
        else:
            print(json.dumps(measure_memory(case, rest[0])))
        return

    started = time.monotonic()
    make_corpus()
    rows = []
    for case, (kind, file, _, transformers_ok, note) in CASES.items():
        repeats = 1 if args.quick else args.repeats
        loaders = ["omnigate", "transformers"] if transformers_ok else ["omnigate"]
        timing = _child("time", case, str(repeats), *loaders)
        memory = {name: _child("memory", case, name) for name in loaders}
        ours, theirs = timing.get("omnigate", {}), timing.get("transformers", {})
        errors = [r["error"] for r in (timing, *memory.values()) if "error" in r]
        row = {
            "case": case,
            "kind": kind,
            "file": file,
            "file_bytes": (CORPUS / file).stat().st_size,
            "repeats": repeats,
            "omnigate_s": ours.get("seconds"),
            "transformers_s": theirs.get("seconds"),
            "ratio": None,  # transformers time / Omnigate time: > 1 means Omnigate is faster
            "omnigate_peak_mb": _mb(memory["omnigate"].get("peak_bytes")),
            "transformers_peak_mb": _mb(memory["transformers"].get("peak_bytes"))
            if transformers_ok
            else None,
            "omnigate_all_s": ours.get("all_seconds"),
            "transformers_all_s": theirs.get("all_seconds"),
            "omnigate_output_shape": ours.get("shape"),
            "transformers_output_shape": theirs.get("shape"),
            "note": "; ".join([note, *errors]).strip("; "),
        }
        if row["omnigate_s"] and row["transformers_s"]:
            row["ratio"] = row["transformers_s"] / row["omnigate_s"]
        rows.append(row)
        print(f"  {case}: done", flush=True)

    report = {
        "benchmark": "media decoding: Omnigate vs transformers loaders",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "targets": {"video": "ratio >= 2", "audio": "ratio >= 1", "image": "ratio >= 1"},
        "cases": rows,
        "wall_seconds": time.monotonic() - started,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "media.json").write_text(json.dumps(report, indent=2))
    _print_table(rows)
    print(f"\nwritten to {RESULTS / 'media.json'} ({report['wall_seconds']:.0f} s)")


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _print_table(rows: list[dict]) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    header = f"{'case':46} {'omnigate s':>10} {'transformers s':>14} {'ratio':>6} {'omni MB':>8} {'tf MB':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['case']:46} {fmt(r['omnigate_s'], '10.3f')} {fmt(r['transformers_s'], '14.3f')} "
            f"{fmt(r['ratio'], '5.2f') + 'x' if r['ratio'] else '     -'} "
            f"{fmt(r['omnigate_peak_mb'], '8.1f')} {fmt(r['transformers_peak_mb'], '8.1f')}"
        )
    for r in rows:
        if r["note"]:
            print(f"note: {r['case']}: {r['note']}")


if __name__ == "__main__":
    main()
