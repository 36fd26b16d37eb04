"""Fuzz target (atheris, coverage-guided): the video decoder (frames and audio track) on arbitrary bytes.

python tests/gateway/fuzz/fuzz_decode_video.py SEED_DIR -max_total_time=60
"""

import atheris

with atheris.instrument_imports(include=["omnigate_gateway"]):
    from omnigate_gateway.media import video

from _harness import run

from omnigate.media import DecodeLimits

LIMITS = DecodeLimits(
    max_video_duration_s=30.0,
    max_video_frames=64,
    max_video_frame_pixels=1920 * 1080,
    max_decoded_bytes=64 * 1024 * 1024,
)

if __name__ == "__main__":
    run(lambda data: video.decode_video(data, 2.0, True, 16000, LIMITS, fit_pixels=12544))
