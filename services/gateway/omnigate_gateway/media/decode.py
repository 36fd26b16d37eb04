"""Decoding media bytes into the plain ``Audio``, ``Image`` and ``Video`` objects of ``omnigate.media``.

Everything here is synchronous and CPU-bound; the server runs it in a thread pool. The format is always
detected from the bytes themselves (``sniff``), never from a URL, file name or Content-Type header.

Limits are checked as early as the format allows: image pixel counts from the header before any pixel is
decoded, audio and video durations and video frame sizes from the container before decoding, video frame
counts from the requested sampling rate before decoding, and all of them again while decoding (headers
can lie), so that decoding stops as soon as one is crossed. Long decodes check a ``StopSignal`` between
packets and blocks: a cancelled request or a passed deadline ends them early.

Video is sampled without decoding what sampling drops, where the container allows: the packets are
demuxed first (cheap: the bytes are in memory), the sampled frames are chosen from their timestamps, and
then only those frames and what they depend on are decoded; whole groups of pictures before a sampled
frame's keyframe are jumped over, and H.264/H.265 frames that nothing refers to are skipped
(``skip_frame``). Decoding uses the codec's frame threads. Frames are converted to RGB (and scaled to fit
the model's bound, ``resize``) in one swscale pass, and turned upright from the display matrix.

Failures are ``MediaDecodeError`` (corrupt, truncated, empty or wrong-kind input), ``InvalidInput`` (a
request the media cannot satisfy, such as audio from a silent video, or media the model's processor would
refuse: pictures longer than ``max_aspect_ratio`` times their width, audio under ``min_audio_duration_s``)
or ``LimitExceeded``. Exceptions
from the decoding libraries never escape: whatever a library raises while reading untrusted bytes is
reported as a decode error naming the format.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import soundfile as sf
import soxr
from PIL import Image as PILImage
from PIL import ImageOps

from omnigate.media import Audio, DecodeLimits, Image, Video
from omnigate_gateway.errors import InvalidInput, LimitExceeded, MediaDecodeError, OmnigateError
from omnigate_gateway.media.cancellation import NEVER, StopSignal
from omnigate_gateway.media.resize import fit_size, resize_image

# Formats each decoder accepts, by ``sniff`` name.
AUDIO_FORMATS = frozenset(
    {"wav", "flac", "ogg", "mp3", "aac", "m4a", "aiff", "caf", "mp4", "mov", "webm", "mkv"}
)
IMAGE_FORMATS = frozenset({"png", "jpeg", "webp", "gif", "bmp", "tiff"})
VIDEO_FORMATS = frozenset({"mp4", "mov", "webm", "mkv", "avi", "ogg", "mpegts"})

# Formats libsndfile reads directly; the rest go through PyAV (FFmpeg).
_SOUNDFILE_FORMATS = frozenset({"wav", "flac", "ogg", "mp3", "aiff", "caf"})
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
_PIL_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]

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

# Slack when comparing frame times with sampling targets (container timestamps are rounded).
_TIME_EPSILON_S = 1e-3


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


def _require_kind(data: bytes, kind: str, accepted: frozenset[str]) -> str:
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
def _library_errors(what: str) -> Iterator[None]:
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


def _open_container(data: bytes, fmt: str) -> av.container.InputContainer:
    return av.open(
        io.BytesIO(data),
        mode="r",
        format=_FFMPEG_DEMUXERS[fmt],
        metadata_errors="ignore",
        io_open=_refuse_nested_io,
    )


# --------------------------------------------------------------------------------------------- audio


def decode_audio(data: bytes, target_rate: int, limits: DecodeLimits, *, stop: StopSignal = NEVER) -> Audio:
    """Decodes audio to mono float32 at ``target_rate`` (channels averaged, resampled with soxr HQ)."""
    if target_rate <= 0:
        raise InvalidInput(f"the audio sample rate must be positive; got {target_rate}")
    fmt = _require_kind(data, "audio", AUDIO_FORMATS)
    what = describe_format(fmt)
    samples: np.ndarray | None = None
    rate = 0
    if fmt in _SOUNDFILE_FORMATS:
        try:
            samples, rate = _read_with_soundfile(data, fmt, limits, stop)
        except OmnigateError:
            raise
        except Exception:  # libsndfile cannot read it; FFmpeg gets a try below
            samples = None
    if samples is None:
        with _library_errors(what):
            with _open_container(data, fmt) as container:
                if not container.streams.audio:
                    raise MediaDecodeError(f"{what} has no audio stream")
                samples, rate = _decode_audio_stream(
                    container, limits.max_audio_duration_s, "audio", limits, stop
                )
    return _finish_audio(samples, rate, target_rate, limits, "the audio", f" ({what})")


def _read_with_soundfile(
    data: bytes, fmt: str, limits: DecodeLimits, stop: StopSignal
) -> tuple[np.ndarray, int]:
    max_duration_s = limits.max_audio_duration_s
    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
        if rate <= 0 or channels <= 0:
            raise MediaDecodeError("the audio header declares no sample rate or no channels")
        if fmt == "wav":  # libsndfile trims a lying data size to the bytes present; the header still counts
            declared = _declared_wav_seconds(data)
            if declared is not None:
                _check_audio_duration(declared, max_duration_s, "audio")
        if fmt != "mp3":  # an MP3's frame count is only an estimate; it is counted while decoding instead
            _check_audio_duration(frames / rate, max_duration_s, "audio")
            _check_decoded_bytes(frames * channels * 4, "the audio", limits)
        max_frames = int(max_duration_s * rate)
        pieces: list[np.ndarray] = []
        total = 0
        # The declared length in one read (it was checked against the limits above), then whatever follows
        # in blocks, counted against the limits as it comes (the header may understate, an MP3 estimates).
        block_frames = min(frames, max_frames + 1) if frames > 0 else 1 << 18
        block_frames = max(1, min(block_frames, limits.max_decoded_bytes // (4 * channels) + 1))
        while True:
            stop.check()
            block = f.read(block_frames, dtype="float32", always_2d=True)
            if len(block) == 0:
                break
            pieces.append(_downmix(block))
            total += len(block)
            if total > max_frames:
                _check_audio_duration(total / rate, max_duration_s, "audio")
            _check_decoded_bytes(total * 4, "the audio", limits)
            block_frames = 1 << 18
    if not pieces:
        return np.zeros(0, dtype=np.float32), rate
    return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces)), rate


def _downmix(block: np.ndarray) -> np.ndarray:
    """(n, channels) float32 to mono by averaging the channels.

    As a matrix-vector product (BLAS): tens of times faster than ``mean`` over the short channel axis.
    """
    channels = block.shape[1]
    if channels == 1:
        return block[:, 0].copy()
    return block @ np.full(channels, 1.0 / channels, dtype=np.float32)


def _declared_wav_seconds(data: bytes) -> float | None:
    """The length a RIFF/WAVE header declares (data chunk size / byte rate); None when it gives none."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, byte_rate = 12, 0
    while pos + 8 <= min(len(data), 1 << 20):  # the chunks before the samples
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk == b"fmt " and size >= 16 and pos + 16 <= len(data):
            byte_rate = struct.unpack_from("<I", data, pos + 16)[0]
        elif chunk == b"data":
            if size in (0, 0xFFFFFFFF) or byte_rate <= 0:  # streaming writers leave the size unset
                return None
            return size / byte_rate
        pos += 8 + size + (size & 1)
    return None


def _decode_audio_stream(
    container: av.container.InputContainer,
    max_duration_s: float,
    what: str,
    limits: DecodeLimits,
    stop: StopSignal = NEVER,
) -> tuple[np.ndarray, int]:
    """Decodes the first audio stream to mono float32 at its own rate."""
    stream = container.streams.audio[0]
    stream.codec_context.thread_type = "AUTO"
    duration = _container_duration(container, stream)
    if duration is not None:
        _check_audio_duration(duration, max_duration_s, what)
    rate = int(stream.codec_context.sample_rate or stream.rate or 0)
    if rate <= 0:
        raise MediaDecodeError(f"the {what} stream declares no sample rate")
    if duration is not None:
        _check_decoded_bytes(int(duration * rate) * 4, f"the {what}", limits)  # mono float32
    max_samples = int(max_duration_s * rate) + rate  # one second of slack over the limit
    # Packed (interleaved) float, same layout and rate. Not planar "fltp": PyAV 18's to_ndarray of a planar
    # frame with more than 8 channels reads plane pointers past AVFrame.data[8] and crashes the process (a
    # 17-channel PCM WAV found by the fuzzer); a packed frame is one plane whatever the channel count.
    resampler = av.AudioResampler(format="flt")
    pieces: list[np.ndarray] = []
    total = 0
    for count, frame in enumerate(container.decode(stream)):
        if count % 64 == 0:
            stop.check()
        if frame.sample_rate and frame.sample_rate != rate:
            raise MediaDecodeError(
                f"the {what} changes sample rate mid-stream ({rate} -> {frame.sample_rate} Hz)"
            )
        for converted in resampler.resample(frame):
            block = _interleaved(converted)
            pieces.append(_downmix(block))
            total += len(block)
        if total > max_samples:  # duration unknown up front, or the header understated it
            _check_audio_duration(total / rate, max_duration_s, what)
        _check_decoded_bytes(total * 4, f"the {what}", limits)
    for converted in resampler.resample(None):
        pieces.append(_downmix(_interleaved(converted)))
    samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return samples, rate


def _interleaved(frame: av.AudioFrame) -> np.ndarray:
    """A packed float32 frame as (samples, channels)."""
    channels = len(frame.layout.channels)
    return frame.to_ndarray().reshape(frame.samples, channels)


def _finish_audio(
    samples: np.ndarray, rate: int, target_rate: int, limits: DecodeLimits, subject: str, detail: str = ""
) -> Audio:
    """Resamples to ``target_rate``, refusing audio under ``min_audio_duration_s`` (or that resampling would
    leave without a sample): the model's audio encoder cannot take it. ``subject`` names it in messages."""
    minimum = limits.min_audio_duration_s
    if samples.size == 0:
        raise MediaDecodeError(f"{subject}{detail} contains no samples; the minimum is {minimum:g} s")
    count = f"{samples.size} sample{'s' if samples.size != 1 else ''}"
    length = f"{subject} is {_short_duration(samples.size / rate)} long ({count} at {rate} Hz)"
    if samples.size / rate < minimum:
        raise InvalidInput(f"{length}; the minimum is {minimum:g} s")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if rate != target_rate:
        samples = soxr.resample(samples, rate, target_rate, quality="HQ").astype(np.float32, copy=False)
        if samples.size == 0:
            raise InvalidInput(f"{length}; at {target_rate} Hz, the model's rate, that leaves no samples")
    np.clip(samples, -1.0, 1.0, out=samples)
    return Audio(samples=samples, sample_rate=target_rate)


def _short_duration(seconds: float) -> str:
    """ "0.0156 ms", "50 ms", "2.5 s": three significant digits, in milliseconds under a second."""
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _check_audio_duration(duration_s: float, limit_s: float, what: str) -> None:
    if duration_s > limit_s:
        raise LimitExceeded(f"the {what} is {duration_s:.1f} s long; the limit is {limit_s:g} s")


def _check_decoded_bytes(size: int, what: str, limits: DecodeLimits) -> None:
    if size > limits.max_decoded_bytes:
        raise LimitExceeded(
            f"{what} would take {size} bytes once decoded; the limit is {limits.max_decoded_bytes} bytes"
        )


# --------------------------------------------------------------------------------------------- image


def decode_image(
    data: bytes, limits: DecodeLimits, *, fit_pixels: int = 0, stop: StopSignal = NEVER
) -> Image:
    """Decodes an image to RGB uint8 (H, W, 3), EXIF orientation applied, alpha composited on white.

    With ``fit_pixels`` > 0 an image over that many pixels is downscaled to fit (``resize.fit_size``); a
    JPEG is then decoded at a reduced scale directly (DCT scaling), never at full size.
    """
    fmt = _require_kind(data, "image", IMAGE_FORMATS)
    what = describe_format(fmt)
    PILImage.init()  # registers every plugin once; ``formats=`` then limits which ones may open the bytes
    with _library_errors(what):
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
            _check_aspect_ratio(width, height, "the image is", limits)
            _check_decoded_bytes(width * height * 4, "the image", limits)
            stop.check()
            target = _fit(width, height, fit_pixels, limits)  # from the full size, whatever draft() does
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


# --------------------------------------------------------------------------------------------- video


def decode_video(
    data: bytes,
    fps: float | None,
    load_audio: bool,
    audio_rate: int,
    limits: DecodeLimits,
    *,
    fit_pixels: int = 0,
    stop: StopSignal = NEVER,
) -> Video:
    """Samples RGB frames from a video at ``fps`` (or the source rate), optionally with its audio track.

    Target times are k / sampled_fps for k = 0, 1, ... below the duration; each takes the first frame at
    or after it. When ``fps`` is None the source rate is used, lowered if needed so that at most
    ``max_video_frames`` frames are kept; an explicit ``fps`` that would need more frames is refused.
    Frames are turned upright (rotation metadata) and, with ``fit_pixels`` > 0, downscaled to fit.
    """
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise InvalidInput(
            f"the video sampling rate must be a positive number of frames per second; got {fps}"
        )
    if load_audio and audio_rate <= 0:
        raise InvalidInput(f"the audio sample rate must be positive; got {audio_rate}")
    fmt = _require_kind(data, "video", VIDEO_FORMATS)
    what = describe_format(fmt)
    with _library_errors(what):
        with _open_container(data, fmt) as container:
            if not container.streams.video:
                raise MediaDecodeError(f"{what} has no video stream")
            if load_audio and not container.streams.audio:
                raise InvalidInput(
                    "the video has no audio track; send a video with sound, or do not ask for the video's audio"
                )
            video = _sample_frames(
                container, fps, limits, fit_pixels, stop, reopen=lambda: _open_container(data, fmt)
            )
        if load_audio:
            with _open_container(data, fmt) as container:
                samples, rate = _decode_audio_stream(
                    container, limits.max_video_duration_s, "video's audio track", limits, stop
                )
            video.audio = _finish_audio(samples, rate, audio_rate, limits, "the video's audio track")
    return video


# Decoders that honour ``skip_frame`` per packet: frames no sampled frame depends on are not decoded.
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc"})
# Highest average source frame rate accepted; bounds the packets a video of the longest allowed duration
# may hold, so that a file of tiny packets with stuck timestamps cannot grow the packet list without end.
_MAX_SOURCE_FPS = 240


@dataclass
class _DecodePlan:
    """Which demuxed packets must be decoded to produce the sampled frames (decode-order indices)."""

    sampled: frozenset[int]  # packets whose frames are sampled (decoded in full)
    last_needed: int  # nothing after this packet is needed (the decoder is flushed after it)
    jumps: dict[int, int]  # at index i, continue at keyframe jumps[i]: the packets between are unneeded
    entries: dict[int, int]  # for each sampled packet, the keyframe decoding it can start from


def _sample_frames(
    container: av.container.InputContainer,
    fps: float | None,
    limits: DecodeLimits,
    fit_pixels: int,
    stop: StopSignal,
    reopen: Callable[[], av.container.InputContainer] | None = None,
) -> Video:
    stream = container.streams.video[0]
    codec = stream.codec_context
    duration = _container_duration(container, stream)
    if duration is not None:
        _check_video_duration(duration, limits)
    width, height = int(codec.width or 0), int(codec.height or 0)
    _check_frame_size(width, height, limits)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    source_fps = float(rate) if rate else 0.0
    if source_fps <= 0 or not math.isfinite(source_fps):
        source_fps = 0.0
    frame_step = 1.0 / source_fps if source_fps else 0.0

    packets = _demux_video(container, stream, limits, stop)
    times = [_seconds(p.pts, p.time_base) for p in packets]
    known = [t for t in times if t is not None]
    timed = bool(packets) and len(known) == len(times)  # every packet has a time
    start = _seconds(stream.start_time, stream.time_base)
    if start is None:
        start = min(known, default=0.0)
    if timed:
        span = max(known) - start + frame_step
        _check_video_duration(span, limits)  # the header may understate the length, or not give it
        if duration is None:
            duration = span

    sampled_fps = _choose_sampling_rate(fps, source_fps, duration, limits)
    planned = _count_targets(duration, sampled_fps) if duration is not None else None
    out_size = _fit(width, height, fit_pixels, limits) if width and height else None
    if planned is not None and out_size is not None:
        _check_decoded_bytes(planned * out_size[0] * out_size[1] * 3, "the sampled video frames", limits)
    relative = [t - start for t in known] if timed else []
    plan = _plan_decoding(packets, relative, sampled_fps, planned) if timed else None

    def finish(frames: np.ndarray, timestamps: list[float]) -> Video:
        if len(frames) < limits.min_video_frames:
            raise MediaDecodeError(
                f"the video gave {len(frames)} frames at {sampled_fps:g} fps; at least "
                f"{limits.min_video_frames} are needed (raise the fps or send a longer clip)"
            )
        total = duration if duration is not None else max(timestamps) + frame_step
        fps_out = source_fps or (len(packets) / total if total > 0 else 0.0)
        if stream.frames:
            count = int(stream.frames)
        elif timed:
            count = len(packets)
        else:
            count = int(round(total * fps_out))
        return Video(
            frames=frames,
            timestamps_s=timestamps,
            sampled_fps=float(sampled_fps),
            source_fps=fps_out,
            duration_s=float(total),
            source_num_frames=count,
        )

    if plan is not None and out_size is not None and reopen is not None:
        segments = _segments(plan, _parallel_decoders())
        if len(segments) > 1:
            decoded = _decode_segments(packets, relative, plan, segments, out_size, limits, stop, reopen)
            if decoded is not None:
                return finish(*decoded)
            # A sampled frame did not come out (a damaged stream): decode once more, in order, below
            # (with this container's own decoder, which the ranges did not use).

    codec = stream.codec_context
    codec.thread_type = "AUTO"  # frame and slice threads
    frames = _FrameStack(planned)
    timestamps: list[float] = []
    next_target = 0
    outputs = 0

    def take(frame: av.VideoFrame) -> None:
        nonlocal next_target, outputs, out_size
        # Frames flushed out of the decoder carry no time base of their own: the stream's applies.
        t = _seconds(frame.pts, frame.time_base or stream.time_base)
        t = (t - start) if t is not None else outputs * frame_step
        outputs += 1
        if planned is not None and next_target >= planned:
            return  # every target has its frame; the rest of the stream is not needed
        if t > limits.max_video_duration_s + _TIME_EPSILON_S:
            raise LimitExceeded(f"the video is longer than the limit of {limits.max_video_duration_s:g} s")
        if t + _TIME_EPSILON_S < next_target / sampled_fps:
            return
        if len(frames) >= limits.max_video_frames:
            raise LimitExceeded(
                f"sampling the video at {sampled_fps:g} fps gives more than {limits.max_video_frames} frames; "
                f"the limit is {limits.max_video_frames} frames (lower the fps or send a shorter clip)"
            )
        _check_frame_size(frame.width, frame.height, limits)
        if out_size is None:  # the header gave no size: the first frame sets it
            out_size = _fit(frame.width, frame.height, fit_pixels, limits)
        _check_decoded_bytes(
            (len(frames) + 1) * out_size[0] * out_size[1] * 3, "the sampled video frames", limits
        )
        frames.add(_upright_rgb(frame, out_size))
        timestamps.append(round(max(t, 0.0), 6))
        # Skip every target this frame already covers, so a gap in the source never repeats a frame.
        next_target = math.floor((t + _TIME_EPSILON_S) * sampled_fps) + 1

    skip_unneeded = plan is not None and codec.name in _SKIP_NONREF_CODECS
    end = len(packets) if plan is None else plan.last_needed + 1
    i = fed = 0
    while i < end:
        if planned is not None and next_target >= planned:
            break  # every target has its frame
        if plan is not None and i in plan.jumps:
            i = plan.jumps[i]
        if fed % 16 == 0:
            stop.check()
        if skip_unneeded and plan is not None:  # skip_unneeded implies a plan
            codec.skip_frame = "DEFAULT" if i in plan.sampled else "NONREF"
        for frame in codec.decode(packets[i]):
            take(frame)
        i += 1
        fed += 1
    codec.skip_frame = "DEFAULT"
    stop.check()
    for frame in codec.decode(None):  # flush: frames the decoder still holds (reordering, threads)
        take(frame)

    if not frames:
        raise MediaDecodeError("no frames could be decoded from the video")
    return finish(frames.array(), timestamps)


class _FrameStack:
    """Sampled frames, written into one preallocated array when their number is known (no second copy
    of every frame, as collecting them in a list and stacking would make)."""

    def __init__(self, capacity: int | None) -> None:
        self._capacity = capacity
        self._buffer: np.ndarray | None = None
        self._list: list[np.ndarray] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pixels: np.ndarray) -> None:
        if self._capacity is None:
            self._list.append(pixels)
        else:
            if self._buffer is None:
                self._buffer = np.empty((self._capacity, *pixels.shape), dtype=np.uint8)
            if pixels.shape != self._buffer.shape[1:]:
                raise MediaDecodeError("the video's frames change orientation mid-stream")
            self._buffer[self._count] = pixels
        self._count += 1

    def array(self) -> np.ndarray:
        if self._buffer is None or self._capacity is None:  # the buffer exists only with a capacity
            return np.stack(self._list)
        if self._count * 2 < self._capacity:  # far fewer than planned: do not keep the unused space
            return self._buffer[: self._count].copy()
        return self._buffer[: self._count]


def _demux_video(
    container: av.container.InputContainer, stream: av.stream.Stream, limits: DecodeLimits, stop: StopSignal
) -> list[av.Packet]:
    """Every packet of the video stream, in decode order (the bytes are in memory already)."""
    cap = int(limits.max_video_duration_s * _MAX_SOURCE_FPS) + 1024
    packets: list[av.Packet] = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        packets.append(packet)
        if len(packets) % 256 == 0:
            stop.check()
            if len(packets) > cap:
                raise LimitExceeded(
                    f"the video has more than {cap} frames; at most {_MAX_SOURCE_FPS} frames per second "
                    f"over {limits.max_video_duration_s:g} s are accepted"
                )
    return packets


def _plan_decoding(
    packets: list[av.Packet], times: list[float], sampled_fps: float, planned: int | None
) -> _DecodePlan | None:
    """Picks the sampled frames from the packets' timestamps, before anything is decoded.

    Uses the same rule as the decoding loop (the first frame at or after each target, in display order),
    so that only those frames and what they depend on need decoding: the packets before a sampled frame's
    keyframe can be jumped over when no sampled frame lies between, decoding can start afresh (in another
    thread) at such a keyframe, and, for codecs that allow it, the frames nothing refers to are skipped.
    """
    sampled: set[int] = set()
    next_target = 0
    for i in sorted(range(len(packets)), key=times.__getitem__):
        if planned is not None and next_target >= planned:
            break
        t = times[i]
        if t + _TIME_EPSILON_S < next_target / sampled_fps:
            continue
        sampled.add(i)
        next_target = math.floor((t + _TIME_EPSILON_S) * sampled_fps) + 1
    if not sampled:
        return None
    keyframes = [i for i, p in enumerate(packets) if p.is_keyframe]
    entries: dict[int, int] = {}
    jumps: dict[int, int] = {}
    fed_through = -1  # packets up to here are decoded anyway
    for s in sorted(sampled):
        # The latest keyframe at or before s (in decode order) that is not shown after s: decoding from it
        # reaches s without the packets before it.
        k = bisect.bisect_right(keyframes, s) - 1
        while k >= 0 and times[keyframes[k]] > times[s] + _TIME_EPSILON_S:
            k -= 1
        entries[s] = keyframes[k] if k >= 0 else 0
        if k >= 0 and keyframes[k] > fed_through + 1:
            jumps[fed_through + 1] = keyframes[k]
        fed_through = s
    return _DecodePlan(frozenset(sampled), max(sampled), jumps, entries)


def _parallel_decoders() -> int:
    """How many decoders one video may use at once: one per core, at most four."""
    return max(1, min(4, os.cpu_count() or 1))


def _segments(plan: _DecodePlan, decoders: int) -> list[tuple[int, int]]:
    """Splits the packets up to the last needed one into ``decoders`` ranges that decode independently.

    A range may start at a keyframe that every later sampled frame can be reached from (its entry keyframe
    is at or after it), so no sampled frame needs packets from an earlier range. Ranges are balanced by
    packet count; with no such keyframes there is one range.
    """
    end = plan.last_needed + 1
    if decoders <= 1:
        return [(0, end)]
    order = sorted(plan.entries)  # sampled packets, in decode order
    suffix_min = [0] * len(order)  # the lowest entry keyframe of the sampled packets from here on
    lowest = end
    for j in range(len(order) - 1, -1, -1):
        lowest = min(lowest, plan.entries[order[j]])
        suffix_min[j] = lowest
    valid = []
    for k in sorted(set(plan.entries.values())):
        first = bisect.bisect_left(order, k)  # the first sampled packet at or after k
        if 0 < k and first < len(order) and suffix_min[first] >= k:
            valid.append(k)
    starts = [0]
    for j in range(1, decoders):
        goal = j * end / decoders
        best = min((k for k in valid if k > starts[-1]), key=lambda k: abs(k - goal), default=None)
        if best is not None and (best - starts[-1]) * decoders > end / 4:  # not a sliver
            starts.append(best)
    return [(lo, hi) for lo, hi in zip(starts, [*starts[1:], end], strict=True)]


def _decode_segments(
    packets: list[av.Packet],
    times: list[float],
    plan: _DecodePlan,
    segments: list[tuple[int, int]],
    out_size: tuple[int, int],
    limits: DecodeLimits,
    stop: StopSignal,
    reopen: Callable[[], av.container.InputContainer],
) -> tuple[np.ndarray, list[float]] | None:
    """Decodes the ranges at once, one decoder (and thread) each, writing every sampled frame into its
    slot of one output array. None when a sampled frame did not come out (a damaged stream).

    Each range gets a decoder of its own from a fresh container over the same bytes; the packets
    themselves (demuxed once) are shared, read-only.
    """
    order = sorted(plan.sampled, key=times.__getitem__)
    slot_of_pts = {packets[i].pts: slot for slot, i in enumerate(order)}
    filled = [False] * len(order)
    output: list[np.ndarray] = []  # the array, once the first frame gives its upright shape
    lock = threading.Lock()
    failed = threading.Event()

    def place(frame: av.VideoFrame) -> None:
        slot = slot_of_pts.get(frame.pts)
        if slot is None or filled[slot]:
            return
        _check_frame_size(frame.width, frame.height, limits)
        pixels = _upright_rgb(frame, out_size)
        with lock:
            if not output:
                output.append(np.empty((len(order), *pixels.shape), dtype=np.uint8))
        if pixels.shape != output[0].shape[1:]:
            raise MediaDecodeError("the video's frames change orientation mid-stream")
        output[0][slot] = pixels
        filled[slot] = True

    def run(lo: int, hi: int) -> None:
        with reopen() as container:  # a decoder of its own, set up from the container's parameters
            codec = container.streams.video[0].codec_context
            codec.thread_type = "SLICE"  # the ranges are the parallelism; no frame threads on top
            skip_unneeded = codec.name in _SKIP_NONREF_CODECS
            i, fed = lo, 0
            while i < hi and not failed.is_set():
                if i in plan.jumps:
                    i = plan.jumps[i]
                    if i >= hi:
                        break
                if fed % 16 == 0:
                    stop.check()
                if skip_unneeded:
                    codec.skip_frame = "DEFAULT" if i in plan.sampled else "NONREF"
                for frame in codec.decode(packets[i]):
                    place(frame)
                i += 1
                fed += 1
            codec.skip_frame = "DEFAULT"
            for frame in codec.decode(None):
                place(frame)

    with ThreadPoolExecutor(len(segments), thread_name_prefix="video-range") as pool:
        futures = [pool.submit(run, lo, hi) for lo, hi in segments]
        try:
            for future in futures:
                future.result()
        except BaseException:
            failed.set()  # the other ranges stop at their next packet
            raise
    if not all(filled):
        return None
    return output[0], [round(max(times[i], 0.0), 6) for i in order]


def _upright_rgb(frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
    """The frame as RGB uint8, scaled to ``size`` (stored orientation) in the same pass as the colour
    conversion, then turned upright as its display matrix says (counter-clockwise degrees)."""
    pixels = frame.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="BICUBIC")
    turns = round((frame.rotation or 0) / 90) % 4
    return np.rot90(pixels, turns) if turns else pixels


def _check_video_duration(duration: float, limits: DecodeLimits) -> None:
    if duration > limits.max_video_duration_s + _TIME_EPSILON_S:
        raise LimitExceeded(
            f"the video is {duration:.1f} s long; the limit is {limits.max_video_duration_s:g} s"
        )


def _check_frame_size(width: int, height: int, limits: DecodeLimits) -> None:
    """A video frame's size (from the header, 0 when it gives none, or from a decoded frame)."""
    if width * height > limits.max_video_frame_pixels:
        raise LimitExceeded(
            f"the video's frames are {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_video_frame_pixels} pixels"
        )
    if width > 0 and height > 0:
        _check_aspect_ratio(width, height, "the video's frames are", limits)


def _check_aspect_ratio(width: int, height: int, subject: str, limits: DecodeLimits) -> None:
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


def _fit(width: int, height: int, fit_pixels: int, limits: DecodeLimits) -> tuple[int, int]:
    """``resize.fit_size``, then the long side shortened where rounding the short one down to whole
    pixels pushed the ratio past ``max_aspect_ratio`` (3980x20 fitted to 50176 pixels is 1579x7, 225:1)."""
    w, h = fit_size(width, height, fit_pixels)
    limit = limits.max_aspect_ratio
    if w > h * limit:
        w = max(1, math.floor(h * limit))
    elif h > w * limit:
        h = max(1, math.floor(w * limit))
    return w, h


def _choose_sampling_rate(
    fps: float | None, source_fps: float, duration: float | None, limits: DecodeLimits
) -> float:
    if fps is None:
        rate = source_fps or 1.0
        if duration is not None and duration > 0 and _count_targets(duration, rate) > limits.max_video_frames:
            rate = limits.max_video_frames / duration
            while _count_targets(duration, rate) > limits.max_video_frames:  # float edge cases
                rate *= 0.999
        return rate
    rate = min(fps, source_fps) if source_fps else fps
    if duration is not None:
        planned = _count_targets(duration, rate)
        if planned > limits.max_video_frames:
            raise LimitExceeded(
                f"sampling {duration:.1f} s of video at {rate:g} fps gives {planned} frames; the limit is "
                f"{limits.max_video_frames} frames (lower the fps or send a shorter clip)"
            )
        if planned < limits.min_video_frames and duration > 0:
            rate = min(limits.min_video_frames / duration, source_fps or math.inf)
    return rate


def _count_targets(duration: float, rate: float) -> int:
    """How many of the times 0, 1/rate, 2/rate, ... fall before ``duration``."""
    return max(1, math.ceil(duration * rate - _TIME_EPSILON_S * rate))


def _container_duration(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    seconds = _seconds(stream.duration, stream.time_base)
    if seconds is None and container.duration is not None and container.duration > 0:
        seconds = container.duration / av.time_base
    return seconds if seconds is not None and seconds > 0 else None


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)
