"""Property-based tests (hypothesis) of the decoders and the resizing rule."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from omnigate.media import DecodeLimits
from omnigate_gateway.errors import OmnigateError
from omnigate_gateway.media.audio import decode_audio
from omnigate_gateway.media.image import decode_image
from omnigate_gateway.media.resize import fit_size
from omnigate_gateway.media.video import decode_video
from tests.support import media_factory as mf

LIMITS = DecodeLimits(max_audio_duration_s=60, max_video_duration_s=60, max_image_pixels=4_000_000)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MAGICS = [
    b"RIFF\x00\x00\x00\x00WAVE",
    b"fLaC",
    b"OggS",
    b"ID3",
    b"\xff\xfb",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"\x00\x00\x00\x18ftypisom",
    b"\x1a\x45\xdf\xa3",
]


def _decode_any(data: bytes) -> None:
    """Every decoder on ``data``: each either decodes or raises a domain error, nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for decode in (
            lambda d: decode_audio(d, 16000, LIMITS),
            lambda d: decode_image(d, LIMITS, fit_pixels=10_000),
            lambda d: decode_video(d, 2.0, True, 16000, LIMITS, fit_pixels=10_000),
        ):
            try:
                decode(data)
            except OmnigateError as e:
                assert str(e)  # a message the caller can read


@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
@FAST
def test_bytes_after_a_magic_number_only_raise_domain_errors(magic, tail):
    _decode_any(magic + tail)


@st.composite
def mutated(draw):
    sources = [
        mf.make_wav(0.1),
        mf.make_flac(0.1),
        mf.make_ogg(0.1),
        mf.make_png(12, 8),
        mf.make_jpeg(12, 8),
        mf.make_gif(12, 8),
        mf.make_video("mp4", "h264", seconds=0.3, w=32, h=32),
        mf.make_video("webm", "vp9", seconds=0.3, w=32, h=32, with_audio=False),
    ]
    data = bytearray(draw(st.sampled_from(sources)))
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        position = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data[position] = draw(st.integers(min_value=0, max_value=255))
    cut = draw(st.integers(min_value=1, max_value=len(data)))
    return bytes(data[:cut])


@given(mutated())
@FAST
def test_damaged_files_only_raise_domain_errors(data):
    _decode_any(data)


@given(
    rate=st.sampled_from([8000, 11025, 16000, 22050, 32000, 44100, 48000]),
    channels=st.integers(min_value=1, max_value=4),
    seconds=st.floats(min_value=0.11, max_value=1.5),
    target=st.sampled_from([16000, 24000]),
    subtype=st.sampled_from(["PCM_16", "PCM_24", "FLOAT"]),
)
@FAST
def test_any_wav_decodes_to_mono_float_at_the_target_rate(rate, channels, seconds, target, subtype):
    frames = max(1, int(seconds * rate))
    samples = np.random.default_rng(frames).uniform(-1, 1, size=(frames, channels)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    audio = decode_audio(buf.getvalue(), target, LIMITS)
    assert audio.sample_rate == target and audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(len(audio.samples) - frames * target / rate) <= 1
    assert np.abs(audio.samples).max() <= 1.0


MODES_BY_FORMAT = {
    "PNG": ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"],
    "JPEG": ["RGB", "L", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
    "GIF": ["P", "L"],
    "BMP": ["RGB", "L", "P"],
    "TIFF": ["RGB", "RGBA", "L", "CMYK", "I;16"],
}


@st.composite
def images(draw):
    fmt = draw(st.sampled_from(sorted(MODES_BY_FORMAT)))
    mode = draw(st.sampled_from(MODES_BY_FORMAT[fmt]))
    w, h = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    orientation = draw(st.integers(1, 8)) if fmt == "JPEG" else 1
    return fmt, mode, w, h, orientation


@given(images(), st.sampled_from([0, 100, 1000]))
@FAST
def test_any_image_decodes_to_rgb_with_orientation_and_bound(spec, fit):
    fmt, mode, w, h, orientation = spec
    image = mf.gradient_image(w, h).convert(mode) if mode != "I;16" else _gray16(w, h)
    buf = io.BytesIO()
    extra = {}
    if orientation != 1:
        exif = PILImage.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    image.save(buf, format=fmt, **extra)
    pixels = decode_image(buf.getvalue(), LIMITS, fit_pixels=fit).pixels
    upright = (h, w) if orientation <= 4 else (w, h)  # orientations 5-8 swap the sides
    expected_w, expected_h = fit_size(upright[1], upright[0], fit)
    assert pixels.shape == (expected_h, expected_w, 3) and pixels.dtype == np.uint8
    assert pixels.flags.c_contiguous


def _gray16(w: int, h: int) -> PILImage.Image:
    return PILImage.fromarray((np.arange(w * h, dtype=np.uint32).reshape(h, w) * 7 % 65536).astype(np.uint16))


@given(
    st.integers(min_value=1, max_value=20000),
    st.integers(min_value=1, max_value=20000),
    st.integers(min_value=0, max_value=50_000_000),
)
@settings(max_examples=500, deadline=None)
def test_fit_size(width, height, max_pixels):
    w, h = fit_size(width, height, max_pixels)
    if max_pixels <= 0 or width * height <= max_pixels:
        assert (w, h) == (width, height)  # within the bound: untouched
        return
    assert 1 <= w <= width and 1 <= h <= height  # never upscaled
    assert w * h <= max_pixels or (w == 1 or h == 1)
    if min(w, h) >= 16:  # aspect ratio kept (up to rounding to whole pixels)
        assert math.isclose(w / h, width / height, rel_tol=2 / min(w, h))
        assert (w + 1) * (h + 1) > max_pixels  # and as large as the bound allows


@pytest.fixture(scope="module")
def clip() -> bytes:
    return mf.make_video("mp4", "h264-bframes", seconds=4.0, fps=10, w=32, h=32, with_audio=False)


@given(fps=st.floats(min_value=0.05, max_value=30.0))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sampled_frames_follow_the_requested_rate(clip, fps):
    video = decode_video(clip, fps, False, 16000, LIMITS)
    times = video.timestamps_s
    effective = min(fps, 10.0)  # never faster than the source
    assert video.sampled_fps == pytest.approx(effective)
    assert times[0] == 0.0 and times[-1] < 4.0
    assert len(times) <= max(1, math.ceil(4.0 * effective - 1e-3 * effective))
    # At most one frame per sampling interval, in order.
    slots = [math.floor((t + 1e-3) * effective) for t in times]
    assert slots == sorted(set(slots))
    for frame, t in zip(video.frames, times, strict=True):
        assert np.abs(frame[24, 24].astype(int) - mf.frame_color(round(t * 10))).max() <= 10
