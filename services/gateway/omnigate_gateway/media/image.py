"""Decoding images into the RGB uint8 ``Image`` of ``omnigate.media``: EXIF orientation applied, alpha
composited on white, and downscaled to what the model keeps (``resize``).

Synchronous and CPU-bound; the server runs it in a thread pool. The pixel count, aspect ratio and decoded
size are checked from the header before any pixel is decoded; Pillow opens only the formats listed here.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps

from omnigate.media import DecodeLimits, Image
from omnigate_gateway.errors import LimitExceeded, MediaDecodeError
from omnigate_gateway.media.cancellation import NEVER, StopSignal
from omnigate_gateway.media.limits import check_aspect_ratio, check_decoded_bytes, fit_within_limits
from omnigate_gateway.media.resize import resize_image
from omnigate_gateway.media.sniff import describe_format, library_errors, require_kind

# Formats ``decode_image`` accepts, by ``sniff`` name, and the Pillow plugins that may open them.
IMAGE_FORMATS = frozenset({"png", "jpeg", "webp", "gif", "bmp", "tiff"})
_PIL_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]


def decode_image(
    data: bytes, limits: DecodeLimits, *, fit_pixels: int = 0, stop: StopSignal = NEVER
) -> Image:
    """Decodes an image to RGB uint8 (H, W, 3), EXIF orientation applied, alpha composited on white.

    With ``fit_pixels`` > 0 an image over that many pixels is downscaled to fit (``resize.fit_size``); a
    JPEG is then decoded at a reduced scale directly (DCT scaling), never at full size.
    """
    fmt = require_kind(data, "image", IMAGE_FORMATS)
    what = describe_format(fmt)
    PILImage.init()  # registers every plugin once; ``formats=`` then limits which ones may open the bytes
    with library_errors(what):
        try:
            image: PILImage.Image = PILImage.open(io.BytesIO(data), formats=_PIL_FORMATS)
        except PILImage.DecompressionBombError as e:  # Pillow's own, higher, limit tripped first
            declared = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{declared.group(1)} pixels" if declared else "too many pixels"
            raise LimitExceeded(
                f"the image is {size}; the limit is {limits.max_image_pixels} pixels"
            ) from None
        with image:
            width, height = image.size  # from the header; nothing decoded yet
            if width * height > limits.max_image_pixels:
                raise LimitExceeded(
                    f"the image is {width}x{height} = {width * height} pixels; "
                    f"the limit is {limits.max_image_pixels} pixels"
                )
            if width <= 0 or height <= 0:
                raise MediaDecodeError(f"the image header declares a {width}x{height} size")
            check_aspect_ratio(width, height, "the image is", limits)
            check_decoded_bytes(width * height * 4, "the image", limits)
            stop.check()
            # From the full size, whatever draft() does.
            target = fit_within_limits(width, height, fit_pixels, limits)
            if fmt == "jpeg" and target != (width, height):
                image.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale, still at least ``target``
            image.load()
            stop.check()
            loaded = image.size
            image = _apply_exif_orientation(image)
            if image.size != loaded and image.size == loaded[::-1]:  # turned by 90 degrees
                target = target[::-1]
            rgb = resize_image(_to_rgb_image(image), target)
            pixels = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))  # read-only: nothing writes it
    return Image(pixels=pixels)


def _apply_exif_orientation(image: PILImage.Image) -> PILImage.Image:
    """The image turned upright as its EXIF orientation says (in place: no copy of an upright image)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a broken EXIF block should not lose an otherwise good image
        pass
    return image


def _to_rgb_image(image: PILImage.Image) -> PILImage.Image:
    """An 8-bit "RGB" image: alpha composited on white, palettes expanded, CMYK converted, 16-bit scaled."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PILImage.alpha_composite(background, rgba)
        mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):  # 16/32-bit grayscale: scale, don't clip, to 8 bits
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0.0)
        if mode == "F":
            scale = 255.0 if peak <= 1.0 else 1.0  # float images hold 0..1 or 0..255
        elif mode == "I" and peak <= 255.0:
            scale = 1.0  # 32-bit container, 8-bit values
        else:
            scale = 255.0 / 65535.0  # 16-bit samples
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return PILImage.fromarray(gray, "L").convert("RGB")
    if mode != "RGB":
        image = image.convert("RGB")
    return image
