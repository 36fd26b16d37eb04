"""Fuzz target (atheris, coverage-guided): the audio decoder on arbitrary bytes.

python tests/gateway/fuzz/fuzz_decode_audio.py SEED_DIR -max_total_time=60
"""

import atheris

with atheris.instrument_imports(include=["omnigate_gateway"]):
    from omnigate_gateway.media import audio

from _harness import run

from omnigate.media import DecodeLimits

LIMITS = DecodeLimits(max_audio_duration_s=30.0, max_decoded_bytes=64 * 1024 * 1024)

if __name__ == "__main__":
    run(lambda data: audio.decode_audio(data, 16000, LIMITS))
