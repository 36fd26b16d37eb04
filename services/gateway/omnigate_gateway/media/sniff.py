"""What media bytes are, and how a decoder opens them: the one place untrusted bytes meet the libraries.

The format is always detected from the bytes themselves (``sniff``), never from a URL, file name or
Content-Type header; ``require_kind`` refuses bytes that are not one of the formats a decoder accepts,
naming what they are instead (``describe_format``). FFmpeg opens them with the demuxer that format names
(``open_container``), never by probing, and may not open other files or URLs from them.

Exceptions from the decoding libraries never escape (``library_errors``): whatever a library raises while
reading untrusted bytes is reported as a ``MediaDecodeError`` naming the format, and running out of memory
as ``LimitExceeded``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction

import av
from PIL import Image as PILImage

from omnigate_gateway.errors import LimitExceeded, MediaDecodeError, OmnigateError

# FFmpeg demuxer for each format. Naming the demuxer instead of letting FFmpeg probe keeps untrusted bytes
# away from demuxers that open other resources (hls, concat, ...).
_FFMPEG_DEMUXERS = {
    "wav": "wav",
    "flac": "flac",
    "ogg": "ogg",
    "mp3": "mp3",
    "aac": "aac",
    "m4a": "mp4",
    "mp4": "mp4",
    "mov": "mov",
    "aiff": "aiff",
    "caf": "caf",
    "webm": "matroska",
    "mkv": "matroska",
    "avi": "avi",
    "mpegts": "mpegts",
}


_DESCRIPTIONS = {
    "wav": "WAV audio",
    "flac": "FLAC audio",
    "ogg": "an Ogg file",
    "mp3": "MP3 audio",
    "aac": "AAC audio",
    "m4a": "M4A audio",
    "aiff": "AIFF audio",
    "caf": "CAF audio",
    "png": "a PNG image",
    "jpeg": "a JPEG image",
    "webp": "a WebP image",
    "gif": "a GIF image",
    "bmp": "a BMP image",
    "tiff": "a TIFF image",
    "heic": "a HEIF/HEIC image",
    "avif": "an AVIF image",
    "ico": "an ICO image",
    "mp4": "an MP4 file",
    "mov": "a QuickTime file",
    "webm": "a WebM file",
    "mkv": "a Matroska file",
    "avi": "an AVI file",
    "mpegts": "an MPEG-TS file",
    "pdf": "a PDF document",
    "zip": "a ZIP archive",
    "gzip": "a gzip archive",
    "html": "an HTML page",
    "json": "JSON text",
    "text": "text",
    "empty": "no data (0 bytes)",
    "unknown": "data in an unrecognised format",
}


def sniff(data: bytes) -> str:
    """Names the format of ``data`` from its leading bytes ("wav", "png", "mp4", ... or "unknown")."""
    if not data:
        return "empty"
    head = data[:64]
    if head[:4] == b"RIFF" and len(head) >= 12:
        return {b"WAVE": "wav", b"WEBP": "webp", b"AVI ": "avi"}.get(head[8:12], "unknown")
    if head[:4] in (b"RF64", b"BW64"):
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 14:
        return "bmp"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ico"
    if head[4:8] == b"ftyp":
        return _iso_bmff_kind(head[8:12])
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm" if b"webm" in data[:128] else "mkv"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"caff":
        return "caf"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xF0) == 0xF0 and (head[1] >> 1) & 0x3 == 0:
        return "aac"  # ADTS header: sync word, layer 0
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0 and (head[1] >> 1) & 0x3 != 0:
        return "mp3"  # MPEG audio frame sync, layer I-III
    if head[:1] == b"\x47" and len(data) > 188 and data[188:189] == b"\x47":
        return "mpegts"
    if head[:5] == b"%PDF-":
        return "pdf"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "html"
    if stripped[:1] in (b"{", b"["):
        return "json"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "unknown"


def _iso_bmff_kind(brand: bytes) -> str:
    if brand in (b"M4A ", b"M4B ", b"M4P "):
        return "m4a"
    if brand == b"qt  ":
        return "mov"
    if brand in (b"avif", b"avis"):
        return "avif"
    if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
        return "heic"
    return "mp4"


def describe_format(fmt: str) -> str:
    """A phrase for messages: "a PNG image", "WAV audio", ..."""
    return _DESCRIPTIONS.get(fmt, f"a {fmt} file")


def require_kind(data: bytes, kind: str, accepted: frozenset[str]) -> str:
    """Sniffs ``data`` and refuses it unless it is one of the ``accepted`` formats of ``kind``."""
    fmt = sniff(data)
    if fmt == "empty":
        raise MediaDecodeError(f"the {kind} is empty (0 bytes)")
    if fmt not in accepted:
        expected = "an image" if kind == "image" else kind
        supported = ", ".join(sorted(accepted))
        raise MediaDecodeError(
            f"expected {expected}, got {describe_format(fmt)}; supported formats: {supported}"
        )
    return fmt


@contextmanager
def library_errors(what: str) -> Iterator[None]:
    """Turns anything a decoding library raises on untrusted bytes into a MediaDecodeError."""
    try:
        yield
    except OmnigateError:
        raise
    except MemoryError:
        raise LimitExceeded(f"{what} needs more memory to decode than this gateway has") from None
    except Exception as e:  # libraries raise many types on malformed input; all of them mean "bad media"
        raise MediaDecodeError(f"could not decode {what}: {_library_detail(e)}") from e


def _library_detail(error: Exception) -> str:
    """A short, address-free reason from a library exception."""
    if isinstance(error, av.FFmpegError):
        detail = error.strerror or ""
    elif isinstance(error, PILImage.UnidentifiedImageError):
        detail = "the data is corrupt or not in the format its header claims"
    else:
        detail = str(error)
    # Drop object reprs such as "<_io.BytesIO object at 0x7f...>".
    detail = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", detail).strip()
    if not detail:
        detail = type(error).__name__
    if len(detail) > 200:
        detail = detail[:200] + "…"
    return detail[0].lower() + detail[1:]


def _refuse_nested_io(url: str, flags: int, options: dict) -> None:
    raise PermissionError("this media may not open other files or URLs")


def open_container(data: bytes, fmt: str) -> av.container.InputContainer:
    return av.open(
        io.BytesIO(data),
        mode="r",
        format=_FFMPEG_DEMUXERS[fmt],
        metadata_errors="ignore",
        io_open=_refuse_nested_io,
    )


def container_duration(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    seconds = to_seconds(stream.duration, stream.time_base)
    if seconds is None and container.duration is not None and container.duration > 0:
        seconds = container.duration / av.time_base
    return seconds if seconds is not None and seconds > 0 else None


def to_seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)
