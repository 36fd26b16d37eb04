"""Decoding audio into the mono float32 ``Audio`` of ``omnigate.media``, resampled to the model's rate.

Synchronous and CPU-bound; the server runs it in a thread pool. libsndfile reads the formats it knows;
the rest, and video audio tracks (``decode_audio_stream``), go through PyAV (FFmpeg). Channels are averaged
and the result resampled with soxr HQ (``finish_audio``).

Durations and decoded sizes are checked from the header before decoding and again while decoding (headers
can lie, an MP3 only estimates its length); long decodes check a ``StopSignal`` between blocks. Audio
under ``min_audio_duration_s`` is refused as ``InvalidInput``: the model's audio encoder cannot take it.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import soundfile as sf
import soxr

from omnigate.media import Audio, DecodeLimits
from omnigate_gateway.errors import InvalidInput, LimitExceeded, MediaDecodeError, OmnigateError
from omnigate_gateway.media.cancellation import NEVER, StopSignal
from omnigate_gateway.media.limits import check_decoded_bytes
from omnigate_gateway.media.sniff import (
    container_duration,
    describe_format,
    library_errors,
    open_container,
    require_kind,
)

# Formats ``decode_audio`` accepts, by ``sniff`` name (a video container's audio track included).
AUDIO_FORMATS = frozenset(
    {"wav", "flac", "ogg", "mp3", "aac", "m4a", "aiff", "caf", "mp4", "mov", "webm", "mkv"}
)
# Formats libsndfile reads directly; the rest go through PyAV (FFmpeg).
_SOUNDFILE_FORMATS = frozenset({"wav", "flac", "ogg", "mp3", "aiff", "caf"})


def decode_audio(data: bytes, target_rate: int, limits: DecodeLimits, *, stop: StopSignal = NEVER) -> Audio:
    """Decodes audio to mono float32 at ``target_rate`` (channels averaged, resampled with soxr HQ)."""
    if target_rate <= 0:
        raise InvalidInput(f"the audio sample rate must be positive; got {target_rate}")
    fmt = require_kind(data, "audio", AUDIO_FORMATS)
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
        with library_errors(what):
            with open_container(data, fmt) as container:
                if not container.streams.audio:
                    raise MediaDecodeError(f"{what} has no audio stream")
                samples, rate = decode_audio_stream(
                    container, limits.max_audio_duration_s, "audio", limits, stop
                )
    return finish_audio(samples, rate, target_rate, limits, "the audio", f" ({what})")


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
            check_decoded_bytes(frames * channels * 4, "the audio", limits)
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
            check_decoded_bytes(total * 4, "the audio", limits)
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


def decode_audio_stream(
    container: av.container.InputContainer,
    max_duration_s: float,
    what: str,
    limits: DecodeLimits,
    stop: StopSignal = NEVER,
) -> tuple[np.ndarray, int]:
    """Decodes the first audio stream to mono float32 at its own rate."""
    stream = container.streams.audio[0]
    stream.codec_context.thread_type = "AUTO"
    duration = container_duration(container, stream)
    if duration is not None:
        _check_audio_duration(duration, max_duration_s, what)
    rate = int(stream.codec_context.sample_rate or stream.rate or 0)
    if rate <= 0:
        raise MediaDecodeError(f"the {what} stream declares no sample rate")
    if duration is not None:
        check_decoded_bytes(int(duration * rate) * 4, f"the {what}", limits)  # mono float32
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
        check_decoded_bytes(total * 4, f"the {what}", limits)
    for converted in resampler.resample(None):
        pieces.append(_downmix(_interleaved(converted)))
    samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return samples, rate


def _interleaved(frame: av.AudioFrame) -> np.ndarray:
    """A packed float32 frame as (samples, channels)."""
    channels = len(frame.layout.channels)
    return frame.to_ndarray().reshape(frame.samples, channels)


def finish_audio(
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
