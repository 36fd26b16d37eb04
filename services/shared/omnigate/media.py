"""Decoded media as plain Python objects.

These are what the gateway's decoders produce, what travels (converted to protobuf at the edge) to the
worker, and what the worker hands to the model's processor. No protobuf or grpc types here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Longest side over shortest side of a picture the Qwen2-VL-family processors take: their ``smart_resize``
# raises ValueError above 200:1 (transformers 5.23; fixed-size processors such as Janus's and SigLIP's take
# any ratio, but a 1-pixel-high strip carries nothing they can use either).
MAX_ASPECT_RATIO = 200.0
# Shortest audio every supported audio encoder takes. transformers 5.23: Qwen2-Audio fails on audio that
# gives it a single audio token (under ~65 ms at 16 kHz), Gemma 3n's feature extractor gives no frame under
# 513 samples (32 ms) and its encoder then fails; a tenth of a second clears all of them.
MIN_AUDIO_DURATION_S = 0.1


@dataclass
class Audio:
    """Mono PCM audio as float32 samples in [-1, 1]."""

    samples: np.ndarray  # shape (n,), dtype float32
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return float(len(self.samples)) / float(self.sample_rate) if self.sample_rate else 0.0


@dataclass
class Image:
    """An RGB image, EXIF orientation already applied."""

    pixels: np.ndarray  # shape (height, width, 3), dtype uint8

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass
class Video:
    """Frames sampled from a video, with what the processor needs to place them in time."""

    frames: np.ndarray  # shape (num_frames, height, width, 3), dtype uint8
    timestamps_s: list[float]  # presentation time of each sampled frame, seconds from start
    sampled_fps: float  # rate the frames were sampled at (the requested fps, or the source fps if lower)
    source_fps: float  # the container's average frame rate
    duration_s: float  # duration of the source video
    source_num_frames: int  # frames in the source video (estimated from duration x fps when unknown)
    audio: Audio | None = None  # the audio track, resampled, when asked for

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class DecodeLimits:
    """Limits applied while decoding (the gateway's settings fill these in)."""

    max_image_pixels: int = 64_000_000
    max_video_frame_pixels: int = 7680 * 4320  # pixels of one source video frame (8K)
    max_audio_duration_s: float = 600.0
    min_audio_duration_s: float = MIN_AUDIO_DURATION_S  # shorter audio (and audio tracks) are refused
    max_video_duration_s: float = 600.0
    max_video_frames: int = 768
    min_video_frames: int = 1
    max_decoded_bytes: int = 1_500_000_000
    max_aspect_ratio: float = MAX_ASPECT_RATIO  # longest side over shortest, of images and video frames
