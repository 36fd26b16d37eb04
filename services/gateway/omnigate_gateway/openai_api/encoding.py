"""Media in the answer's formats: 16-bit PCM as WAV (whole, or a header for a stream of unknown length) and
a generated image as PNG, JPEG or WebP at the requested size."""

from __future__ import annotations

import io
import struct
import wave

from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway.openai_api.protocol import IMAGE_OUTPUT_FORMATS


def wav_header(sample_rate: int, channels: int, data_bytes: int | None) -> bytes:
    """A 44-byte PCM 16-bit WAV header; ``data_bytes=None`` writes the 0xFFFFFFFF sizes of a WAV stream of
    unknown length (what ffmpeg writes to a pipe; libsndfile, ffmpeg, browsers and Python's wave read it)."""
    size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    block = channels * 2
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
        + b"data"
        + struct.pack("<I", size)
    )


def wav_bytes(pcm: bytes, sample_rate: int, channels: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buffer.getvalue()


def image_result(
    image: gw.GeneratedImage, output_format: str, size: tuple[int, int] | None
) -> tuple[bytes, int, int]:
    """The generated image in the requested format and size (Pillow; PNG as generated needs no work)."""
    if output_format == "png" and size is None and image.mime_type == "image/png":
        return image.data, image.width, image.height
    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as opened:
        picture = opened.convert("RGB")
        if size is not None and picture.size != size:
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        picture.save(out, format=IMAGE_OUTPUT_FORMATS[output_format])
        return out.getvalue(), picture.width, picture.height
