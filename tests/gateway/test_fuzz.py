"""Runs each coverage-guided fuzz target (atheris, in fuzz/) briefly, from seeds of valid media.

A finding (a non-domain exception, a crash, a timeout or memory blow-up) fails the test with libFuzzer's
report; the input is saved under the test's temporary directory. Longer runs by hand:
``python tests/gateway/fuzz/fuzz_decode_video.py SEED_DIR -max_total_time=600``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import media_factory as mf

pytest.importorskip("atheris")

pytestmark = pytest.mark.slow

FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"
SECONDS = float(os.environ.get("OMNIGATE_FUZZ_SECONDS", "4"))  # per target; CI keeps it brief

SEEDS = {
    "fuzz_decode_audio": lambda: {
        "a.wav": mf.make_wav(0.1),
        "a.flac": mf.make_flac(0.1),
        "a.ogg": mf.make_ogg(0.1),
        "a.opus": mf.make_opus(0.1),
        "a.mp3": mf.make_mp3(0.1),
        "a.m4a": mf.make_m4a(0.1),
        "a.aac": mf.make_aac(0.1),
        "a.webm": mf.make_webm_audio(0.1),
    },
    "fuzz_decode_image": lambda: {
        f"i.{fmt}": mf.make_image(fmt, 16, 12) for fmt in ("png", "jpeg", "webp", "gif", "bmp", "tiff")
    },
    "fuzz_decode_video": lambda: {
        "v.mp4": mf.make_video("mp4", "h264", seconds=0.3, w=32, h=32),
        "v265.mp4": mf.make_video("mp4", "h265", seconds=0.3, w=32, h=32, with_audio=False),
        "v.mkv": mf.make_video("mkv", "h264", seconds=0.3, w=32, h=32),
        "v.webm": mf.make_video("webm", "vp9", seconds=0.3, w=32, h=32),
        "v8.webm": mf.make_video("webm", "vp8", seconds=0.3, w=32, h=32, with_audio=False),
    },
    "fuzz_url_policy": lambda: {
        "u1": b"http://public.example/a.png",
        "u2": b"https://2130706433:8080/x",
        "u3": b"http://[::ffff:127.0.0.1]/",
        "u4": b"http://private.example/",
        "u5": b"http://0x7f.1/",
    },
}


@pytest.mark.parametrize("target", sorted(SEEDS))
def test_fuzz_target(target, tmp_path):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for name, data in SEEDS[target]().items():
        (seeds / name).write_bytes(data)
    artifacts = tmp_path / "findings"
    artifacts.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ_DIR / f"{target}.py"),
            str(seeds),
            f"-max_total_time={SECONDS:g}",
            "-timeout=20",  # seconds per input
            "-rss_limit_mb=3072",
            "-max_len=262144",
            "-seed=1",
            f"-artifact_prefix={artifacts}/",
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        env={**os.environ, "SVT_LOG": "0"},
    )
    output = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"{target} found a problem (inputs in {artifacts}):\n{output}"
    assert "Done" in output, output  # libFuzzer ran and finished on its own
