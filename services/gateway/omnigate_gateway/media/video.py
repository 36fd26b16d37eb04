"""Decoding video into the ``Video`` of ``omnigate.media``: frames sampled at the requested fps, and the
video's audio track.

Synchronous and CPU-bound; the server runs it in a thread pool. The duration and frame size are checked
from the container before decoding, the number of sampled frames from the sampling rate
(``_choose_sampling_rate``) before decoding, and all of them again while decoding (headers can lie), so
that decoding stops as soon as one is crossed; a ``StopSignal`` is checked between packets.

Video is sampled without decoding what sampling drops, where the container allows: the packets are
demuxed first (cheap: the bytes are in memory), the sampled frames are chosen from their timestamps
(``_plan_decoding``), and then only those frames and what they depend on are decoded; whole groups of
pictures before a sampled frame's keyframe are jumped over, and H.264/H.265 frames that nothing refers to
are skipped (``skip_frame``). The decoding itself is one loop (``_feed_decoder``), run either once over
the whole stream with the codec's frame threads (``_sample_frames``) or on independent ranges of it at
once, one decoder each (``_decode_segments``). Frames are converted to RGB (and scaled to fit the model's
bound, ``resize``) in one swscale pass, and turned upright from the display matrix.

A video without audio asked for its audio track is ``InvalidInput``.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import av
import numpy as np

from omnigate.media import DecodeLimits, Video
from omnigate_gateway.errors import InvalidInput, LimitExceeded, MediaDecodeError
from omnigate_gateway.media.audio import decode_audio_stream, finish_audio
from omnigate_gateway.media.cancellation import NEVER, StopSignal
from omnigate_gateway.media.limits import check_aspect_ratio, check_decoded_bytes, fit_within_limits
from omnigate_gateway.media.sniff import (
    container_duration,
    describe_format,
    library_errors,
    open_container,
    require_kind,
    to_seconds,
)

# Formats ``decode_video`` accepts, by ``sniff`` name.
VIDEO_FORMATS = frozenset({"mp4", "mov", "webm", "mkv", "avi", "ogg", "mpegts"})
# Decoders that honour ``skip_frame`` per packet: frames no sampled frame depends on are not decoded.
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc"})
# Highest average source frame rate accepted; bounds the packets a video of the longest allowed duration
# may hold, so that a file of tiny packets with stuck timestamps cannot grow the packet list without end.
_MAX_SOURCE_FPS = 240
# Slack when comparing frame times with sampling targets (container timestamps are rounded).
_TIME_EPSILON_S = 1e-3


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
    fmt = require_kind(data, "video", VIDEO_FORMATS)
    what = describe_format(fmt)
    with library_errors(what):
        with open_container(data, fmt) as container:
            if not container.streams.video:
                raise MediaDecodeError(f"{what} has no video stream")
            if load_audio and not container.streams.audio:
                raise InvalidInput(
                    "the video has no audio track; send a video with sound, or do not ask for the video's audio"
                )
            video = _sample_frames(
                container, fps, limits, fit_pixels, stop, reopen=lambda: open_container(data, fmt)
            )
        if load_audio:
            with open_container(data, fmt) as container:
                samples, rate = decode_audio_stream(
                    container, limits.max_video_duration_s, "video's audio track", limits, stop
                )
            video.audio = finish_audio(samples, rate, audio_rate, limits, "the video's audio track")
    return video


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
    duration = container_duration(container, stream)
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
    times = [to_seconds(p.pts, p.time_base) for p in packets]
    known = [t for t in times if t is not None]
    timed = bool(packets) and len(known) == len(times)  # every packet has a time
    start = to_seconds(stream.start_time, stream.time_base)
    if start is None:
        start = min(known, default=0.0)
    if timed:
        span = max(known) - start + frame_step
        _check_video_duration(span, limits)  # the header may understate the length, or not give it
        if duration is None:
            duration = span

    sampled_fps = _choose_sampling_rate(fps, source_fps, duration, limits)
    planned = _count_targets(duration, sampled_fps) if duration is not None else None
    out_size = fit_within_limits(width, height, fit_pixels, limits) if width and height else None
    if planned is not None and out_size is not None:
        check_decoded_bytes(planned * out_size[0] * out_size[1] * 3, "the sampled video frames", limits)
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
        t = to_seconds(frame.pts, frame.time_base or stream.time_base)
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
            out_size = fit_within_limits(frame.width, frame.height, fit_pixels, limits)
        check_decoded_bytes(
            (len(frames) + 1) * out_size[0] * out_size[1] * 3, "the sampled video frames", limits
        )
        frames.add(_upright_rgb(frame, out_size))
        timestamps.append(round(max(t, 0.0), 6))
        # Skip every target this frame already covers, so a gap in the source never repeats a frame.
        next_target = math.floor((t + _TIME_EPSILON_S) * sampled_fps) + 1

    end = len(packets) if plan is None else plan.last_needed + 1
    _feed_decoder(
        codec, packets, 0, end, plan, stop, take, done=lambda: planned is not None and next_target >= planned
    )

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
            _feed_decoder(codec, packets, lo, hi, plan, stop, place, done=failed.is_set)

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


def _feed_decoder(
    codec: av.video.codeccontext.VideoCodecContext,
    packets: list[av.Packet],
    lo: int,
    hi: int,
    plan: _DecodePlan | None,
    stop: StopSignal,
    take: Callable[[av.VideoFrame], None],
    done: Callable[[], bool],
) -> None:
    """The video decoding loop: feeds ``packets[lo:hi]`` to ``codec`` in decode order, then flushes it,
    handing every frame that comes out to ``take``.

    With a ``plan``, the packets it does not need are jumped over and, for codecs that allow it, frames
    nothing refers to are not decoded. Feeding stops early once ``done()`` (every target has its frame, or
    another range failed) or when a jump leads past ``hi`` (into a later range); the flush still runs.
    """
    sampled = plan.sampled if plan is not None and codec.name in _SKIP_NONREF_CODECS else None
    i, fed = lo, 0
    while i < hi and not done():
        if plan is not None and i in plan.jumps:
            i = plan.jumps[i]
            if i >= hi:
                break
        if fed % 16 == 0:
            stop.check()
        if sampled is not None:
            codec.skip_frame = "DEFAULT" if i in sampled else "NONREF"
        for frame in codec.decode(packets[i]):
            take(frame)
        i += 1
        fed += 1
    codec.skip_frame = "DEFAULT"
    stop.check()
    for frame in codec.decode(None):  # flush: frames the decoder still holds (reordering, threads)
        take(frame)


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
        check_aspect_ratio(width, height, "the video's frames are", limits)


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
