"""Bounding decoded pictures by what the model's processor keeps of them, before they travel to the worker.

The worker reports, in GetModelInfo, how many pixels its processor keeps of one image and of one video
frame (``ModelInfo.max_image_pixels`` / ``max_video_frame_pixels``; Qwen2-VL-style processors call it
``max_pixels``). A picture over that bound is downscaled here, aspect ratio preserved, to at most that
many pixels; the processor would have shrunk it anyway, so a 4K image or a 1080p video travels at the
size the model can use instead of raw. A picture within the bound is never touched: ``fit_size`` returns
its own size and nothing is resampled.

The bound assumes an aspect-preserving processor (the Qwen-VL family, Janus and most any-to-any
processors); ``OMNIGATE_GATEWAY_FIT_MEDIA_TO_MODEL=false`` turns it off.

Decoders use ``fit_size`` to pick the output size as early as the format allows (JPEG DCT scaling,
scaling inside the video frame conversion) and ``resize_image`` for the final resampling of an image.
"""

from __future__ import annotations

import math

from PIL import Image as PILImage

# Bicubic matches what Qwen-VL-style processors use for their own resize.
RESAMPLE = PILImage.Resampling.BICUBIC
# Pillow first reduces by an integer factor (box filter) down to this multiple of the target size, then
# resamples: as good as a full bicubic resize for large reductions and several times faster.
REDUCING_GAP = 3.0


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most ``max_pixels`` pixels (never larger).

    ``max_pixels`` <= 0 means no bound. Each side is at least 1 pixel.
    """
    if max_pixels <= 0 or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    # A hair over the exact value so that e.g. 2160 * (224 / 2160) floors to 224, not 223.
    new_w = max(1, math.floor(width * scale + 1e-6))
    new_h = max(1, math.floor(height * scale + 1e-6))
    while new_w * new_h > max_pixels:  # the epsilon (or the 1-pixel floor) overshot
        if new_w >= new_h and new_w > 1:
            new_w -= 1
        elif new_h > 1:
            new_h -= 1
        else:
            break
    return new_w, new_h


def resize_image(image: PILImage.Image, size: tuple[int, int]) -> PILImage.Image:
    """``image`` resized to ``size`` (the same object when it is that size already)."""
    if image.size == tuple(size):
        return image
    return image.resize(size, RESAMPLE, reducing_gap=REDUCING_GAP)
