"""Fuzz target (atheris, coverage-guided): the image decoder on arbitrary bytes.

python tests/gateway/fuzz/fuzz_decode_image.py SEED_DIR -max_total_time=60
"""

import atheris

with atheris.instrument_imports(include=["omnigate_gateway"]):
    from omnigate_gateway.media import image

from _harness import run

from omnigate.media import DecodeLimits

LIMITS = DecodeLimits(max_image_pixels=4_000_000, max_decoded_bytes=64 * 1024 * 1024)

if __name__ == "__main__":
    run(lambda data: image.decode_image(data, LIMITS, fit_pixels=50176))
