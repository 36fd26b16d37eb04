"""The limit checks the audio, image and video decoders share: decoded size, aspect ratio, and the size a
picture is fitted to without breaking the aspect ratio limit.

Limits are checked as early as the format allows (from headers, before anything is decoded) and again
while decoding, since headers can lie; the checks particular to one kind of media live with its decoder.
"""

from __future__ import annotations

import math

from omnigate.media import DecodeLimits
from omnigate_gateway.errors import InvalidInput, LimitExceeded
from omnigate_gateway.media.resize import fit_size


def check_decoded_bytes(size: int, what: str, limits: DecodeLimits) -> None:
    if size > limits.max_decoded_bytes:
        raise LimitExceeded(
            f"{what} would take {size} bytes once decoded; the limit is {limits.max_decoded_bytes} bytes"
        )


def check_aspect_ratio(width: int, height: int, subject: str, limits: DecodeLimits) -> None:
    """Refuses a picture longer on one side than ``max_aspect_ratio`` times the other (the model's
    processor would refuse it: ``MAX_ASPECT_RATIO``)."""
    ratio = max(width, height) / min(width, height)
    limit = limits.max_aspect_ratio
    if ratio > limit:
        shown = f"{ratio:.1f}".removesuffix(".0")
        if float(shown) <= limit:  # 200.04 must not read as 200
            shown = f"{ratio:.6g}"
        raise InvalidInput(
            f"{subject} {width}x{height} pixels (aspect ratio {shown}:1); the limit is {limit:g}:1"
        )


def fit_within_limits(width: int, height: int, fit_pixels: int, limits: DecodeLimits) -> tuple[int, int]:
    """``resize.fit_size``, then the long side shortened where rounding the short one down to whole
    pixels pushed the ratio past ``max_aspect_ratio`` (3980x20 fitted to 50176 pixels is 1579x7, 225:1)."""
    w, h = fit_size(width, height, fit_pixels)
    limit = limits.max_aspect_ratio
    if w > h * limit:
        w = max(1, math.floor(h * limit))
    elif h > w * limit:
        h = max(1, math.floor(w * limit))
    return w, h
