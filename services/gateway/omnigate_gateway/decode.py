"""Decoding media bytes into the plain ``Audio``, ``Image`` and ``Video`` objects of ``omnigate.media``.

Everything here is synchronous and CPU-bound; the server runs it in a thread pool. The format is always
detected from the bytes themselves (``sniff``), never from a URL, file name or Content-Type header.

Limits are checked as early as the format allows: image pixel counts from the header before any pixel is
decoded, audio and video durations from the container before decoding, and video frame counts from the
requested sampling rate before decoding.

Failures are ``MediaDecodeError`` (corrupt, truncated, empty or wrong-kind input), ``InvalidInput`` (a
request the media cannot satisfy, such as audio from a silent video) or ``LimitExceeded``. Exceptions
from the decoding libraries never escape: whatever a library raises while reading untrusted bytes is
reported as a decode error naming the format.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction

import av
import numpy as np
import soundfile as sf
import soxr
from PIL import Image as PILImage
from PIL import ImageOps

from omnigate.media import Audio, DecodeLimits, Image, Video
from omnigate_gateway.errors import InvalidInput, LimitExceeded, MediaDecodeError, OmnigateError

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


def decode_audio(data: bytes, target_rate: int, limits: DecodeLimits) -> Audio:
    """Decodes audio to mono float32 at ``target_rate`` (channels averaged, resampled with soxr HQ)."""
    if target_rate <= 0:
        raise InvalidInput(f"the audio sample rate must be positive; got {target_rate}")
    fmt = _require_kind(data, "audio", AUDIO_FORMATS)
    what = describe_format(fmt)
    samples: np.ndarray | None = None
    rate = 0
    if fmt in _SOUNDFILE_FORMATS:
        try:
            samples, rate = _read_with_soundfile(data, fmt, limits)
        except OmnigateError:
            raise
        except Exception:  # libsndfile cannot read it; FFmpeg gets a try below
            samples = None
    if samples is None:
        with _library_errors(what):
            with _open_container(data, fmt) as container:
                if not container.streams.audio:
                    raise MediaDecodeError(f"{what} has no audio stream")
                samples, rate = _decode_audio_stream(container, limits.max_audio_duration_s, "audio", limits)
    return _finish_audio(samples, rate, target_rate, what)


def _read_with_soundfile(data: bytes, fmt: str, limits: DecodeLimits) -> tuple[np.ndarray, int]:
    max_duration_s = limits.max_audio_duration_s
    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
        if rate <= 0 or channels <= 0:
            raise MediaDecodeError("the audio header declares no sample rate or no channels")
        if fmt != "mp3":  # an MP3's frame count is only an estimate; it is counted while decoding instead
            _check_audio_duration(frames / rate, max_duration_s, "audio")
            _check_decoded_bytes(frames * channels * 4, "the audio", limits)
        max_frames = int(max_duration_s * rate)
        pieces: list[np.ndarray] = []
        total = 0
        while True:
            block = f.read(1 << 16, dtype="float32", always_2d=True)
            if len(block) == 0:
                break
            pieces.append(block.mean(axis=1, dtype=np.float32))
            total += len(block)
            if total > max_frames:
                _check_audio_duration(total / rate, max_duration_s, "audio")
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)), rate


def _decode_audio_stream(
    container: av.container.InputContainer, max_duration_s: float, what: str, limits: DecodeLimits
) -> tuple[np.ndarray, int]:
    """Decodes the first audio stream to mono float32 at its own rate."""
    stream = container.streams.audio[0]
    stream.thread_type = "AUTO"
    duration = _container_duration(container, stream)
    if duration is not None:
        _check_audio_duration(duration, max_duration_s, what)
    rate = int(stream.codec_context.sample_rate or stream.rate or 0)
    if rate <= 0:
        raise MediaDecodeError(f"the {what} stream declares no sample rate")
    if duration is not None:
        _check_decoded_bytes(int(duration * rate) * 4, f"the {what}", limits)  # mono float32
    max_samples = int(max_duration_s * rate) + rate  # one second of slack over the limit
    resampler = av.AudioResampler(format="fltp")  # planar float, same layout and rate
    pieces: list[np.ndarray] = []
    total = 0
    for frame in container.decode(stream):
        if frame.sample_rate and frame.sample_rate != rate:
            raise MediaDecodeError(
                f"the {what} changes sample rate mid-stream ({rate} -> {frame.sample_rate} Hz)"
            )
        for converted in resampler.resample(frame):
            planes = converted.to_ndarray()  # (channels, n) float32
            pieces.append(planes.mean(axis=0, dtype=np.float32))
            total += planes.shape[1]
        if total > max_samples:  # duration unknown up front, or the header understated it
            _check_audio_duration(total / rate, max_duration_s, what)
    for converted in resampler.resample(None):
        planes = converted.to_ndarray()
        pieces.append(planes.mean(axis=0, dtype=np.float32))
    samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return samples, rate


def _finish_audio(samples: np.ndarray, rate: int, target_rate: int, what: str) -> Audio:
    if samples.size == 0:
        raise MediaDecodeError(f"{what} contains no audio samples")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if rate != target_rate:
        samples = soxr.resample(samples, rate, target_rate, quality="HQ").astype(np.float32, copy=False)
    np.clip(samples, -1.0, 1.0, out=samples)
    return Audio(samples=samples, sample_rate=target_rate)


def _check_audio_duration(duration_s: float, limit_s: float, what: str) -> None:
    if duration_s > limit_s:
        raise LimitExceeded(f"the {what} is {duration_s:.1f} s long; the limit is {limit_s:g} s")


def _check_decoded_bytes(size: int, what: str, limits: DecodeLimits) -> None:
    if size > limits.max_decoded_bytes:
        raise LimitExceeded(
            f"{what} would take {size} bytes once decoded; the limit is {limits.max_decoded_bytes} bytes"
        )


# --------------------------------------------------------------------------------------------- image


def decode_image(data: bytes, limits: DecodeLimits) -> Image:
    """Decodes an image to RGB uint8 (H, W, 3), EXIF orientation applied, alpha composited on white."""
    fmt = _require_kind(data, "image", IMAGE_FORMATS)
    what = describe_format(fmt)
    PILImage.init()  # registers every plugin once; ``formats=`` then limits which ones may open the bytes
    with _library_errors(what):
        try:
            image = PILImage.open(io.BytesIO(data), formats=_PIL_FORMATS)
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
            image.load()
            image = _apply_exif_orientation(image)
            pixels = _to_rgb_array(image)
    return Image(pixels=pixels)


def _apply_exif_orientation(image: PILImage.Image) -> PILImage.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # a broken EXIF block should not lose an otherwise good image
        return image


def _to_rgb_array(image: PILImage.Image) -> np.ndarray:
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
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


# --------------------------------------------------------------------------------------------- video


def decode_video(
    data: bytes, fps: float | None, load_audio: bool, audio_rate: int, limits: DecodeLimits
) -> Video:
    """Samples RGB frames from a video at ``fps`` (or the source rate), optionally with its audio track.

    Target times are k / sampled_fps for k = 0, 1, ... below the duration; each takes the first decoded
    frame at or after it. When ``fps`` is None the source rate is used, lowered if needed so that at most
    ``max_video_frames`` frames are kept; an explicit ``fps`` that would need more frames is refused.
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
            video = _sample_frames(container, fps, limits)
        if load_audio:
            with _open_container(data, fmt) as container:
                samples, rate = _decode_audio_stream(
                    container, limits.max_video_duration_s, "video's audio track", limits
                )
            video.audio = _finish_audio(samples, rate, audio_rate, "the video's audio track")
    return video


def _sample_frames(container: av.container.InputContainer, fps: float | None, limits: DecodeLimits) -> Video:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    duration = _container_duration(container, stream)
    if duration is not None and duration > limits.max_video_duration_s:
        raise LimitExceeded(
            f"the video is {duration:.1f} s long; the limit is {limits.max_video_duration_s:g} s"
        )
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    source_fps = float(rate) if rate else 0.0
    if source_fps <= 0 or not math.isfinite(source_fps):
        source_fps = 0.0
    width = int(stream.codec_context.width or 0)
    height = int(stream.codec_context.height or 0)

    sampled_fps = _choose_sampling_rate(fps, source_fps, duration, limits)
    planned = _count_targets(duration, sampled_fps) if duration is not None else None
    if planned is not None and width and height:
        _check_decoded_bytes(planned * width * height * 3, "the sampled video frames", limits)

    start = _seconds(stream.start_time, stream.time_base) or 0.0
    frame_step = 1.0 / source_fps if source_fps else 0.0
    frames: list[np.ndarray] = []
    timestamps: list[float] = []
    next_target = 0
    decoded = 0
    last_time = 0.0
    for frame in container.decode(stream):
        t = _seconds(frame.pts, frame.time_base)
        t = (t - start) if t is not None else decoded * frame_step
        decoded += 1
        last_time = max(last_time, t)
        if planned is not None and next_target >= planned:
            break  # every target has its frame; the rest of the stream is not needed
        if t > limits.max_video_duration_s + _TIME_EPSILON_S:  # duration was unknown up front
            raise LimitExceeded(f"the video is longer than the limit of {limits.max_video_duration_s:g} s")
        if t + _TIME_EPSILON_S < next_target / sampled_fps:
            continue
        if len(frames) >= limits.max_video_frames:
            raise LimitExceeded(
                f"sampling the video at {sampled_fps:g} fps gives more than {limits.max_video_frames} frames; "
                f"the limit is {limits.max_video_frames} frames (lower the fps or send a shorter clip)"
            )
        frames.append(frame.to_ndarray(format="rgb24"))
        timestamps.append(round(max(t, 0.0), 6))
        # Skip every target this frame already covers, so a gap in the source never repeats a frame.
        next_target = math.floor((t + _TIME_EPSILON_S) * sampled_fps) + 1

    if not frames:
        raise MediaDecodeError("no frames could be decoded from the video")
    if len(frames) < limits.min_video_frames:
        raise MediaDecodeError(
            f"the video gave {len(frames)} frames at {sampled_fps:g} fps; at least {limits.min_video_frames} "
            "are needed (raise the fps or send a longer clip)"
        )
    if duration is None:
        duration = last_time + frame_step
    if source_fps == 0.0:
        source_fps = decoded / duration if duration > 0 else 0.0
    source_num_frames = int(stream.frames) if stream.frames else int(round(duration * source_fps))
    return Video(
        frames=np.stack(frames),
        timestamps_s=timestamps,
        sampled_fps=float(sampled_fps),
        source_fps=source_fps,
        duration_s=float(duration),
        source_num_frames=source_num_frames,
    )


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
