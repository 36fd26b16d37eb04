"""Decoding audio, images and video from generated media, and refusing bad or oversized input clearly."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from media_factory import (
    frame_color,
    gradient_image,
    make_bmp,
    make_flac,
    make_gif,
    make_jpeg,
    make_m4a,
    make_mp3,
    make_mp4,
    make_ogg,
    make_png,
    make_tiff,
    make_wav,
    make_webm,
    make_webp,
)
from PIL import Image as PILImage

from omnigate.media import DecodeLimits
from omnigate_gateway.decode import decode_audio, decode_image, decode_video, sniff
from omnigate_gateway.errors import (
    ErrorCode,
    InvalidInput,
    LimitExceeded,
    MediaDecodeError,
    OmnigateError,
)

LIMITS = DecodeLimits()


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1.0 / rate)[int(np.argmax(spectrum))])


# --------------------------------------------------------------------------------------------- sniff


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (make_wav, "wav"),
        (make_flac, "flac"),
        (make_ogg, "ogg"),
        (make_mp3, "mp3"),
        (make_m4a, "mp4"),  # PyAV writes the generic "isom" brand, not "M4A "
        (make_png, "png"),
        (make_jpeg, "jpeg"),
        (make_webp, "webp"),
        (make_gif, "gif"),
        (make_bmp, "bmp"),
        (make_tiff, "tiff"),
        (lambda: make_mp4(0.5), "mp4"),
        (lambda: make_webm(0.5), "webm"),
        (lambda: b"", "empty"),
        (lambda: b"%PDF-1.7\n...", "pdf"),
        (lambda: b"<!DOCTYPE html><html>", "html"),
        (lambda: bytes([0x00, 0x01, 0x02, 0x99, 0xFE]), "unknown"),
    ],
)
def test_sniff(make, expected):
    assert sniff(make()) == expected


# --------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize(
    ("make", "tolerance_s"),
    [
        (lambda: make_wav(1.0, 16000), 0.0),
        (lambda: make_flac(1.0, 22050), 0.0),
        (lambda: make_ogg(1.0, 16000), 0.01),
        (lambda: make_mp3(1.0, 16000), 0.06),
        (lambda: make_m4a(1.0, 44100), 0.05),  # AAC in MP4: via PyAV
        (lambda: make_webm(1.0, w=16, h=16), 0.05),  # Opus in WebM: via PyAV
        (lambda: make_mp4(1.0, w=16, h=16), 0.05),  # the audio track of a video file
    ],
    ids=["wav", "flac", "ogg-vorbis", "mp3", "m4a-aac", "webm-opus", "mp4-aac"],
)
def test_decode_audio_formats(make, tolerance_s):
    audio = decode_audio(make(), 16000, LIMITS)
    assert audio.sample_rate == 16000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(audio.duration_s - 1.0) <= tolerance_s + 1e-9
    assert np.abs(audio.samples).max() <= 1.0
    assert abs(peak_frequency(audio.samples, 16000) - 440.0) < 5.0


def test_resample_stereo_44k_to_mono_16k_keeps_the_tone():
    audio = decode_audio(make_wav(1.0, 44100, channels=2, freq=1000.0), 16000, LIMITS)
    assert audio.samples.shape == (16000,)
    assert abs(peak_frequency(audio.samples, 16000) - 1000.0) < 2.0
    # Channels are averaged: left is the tone at 0.5, right the same tone at 0.25 -> 0.375.
    steady = audio.samples[1000:-1000]
    assert abs(np.abs(steady).max() - 0.375) < 0.01


def test_upsample_keeps_length_and_tone():
    audio = decode_audio(make_flac(0.5, 8000, freq=300.0), 24000, LIMITS)
    assert audio.samples.shape == (12000,)
    assert abs(peak_frequency(audio.samples, 24000) - 300.0) < 3.0


@pytest.mark.parametrize("make", [make_wav, make_m4a], ids=["soundfile", "pyav"])
def test_over_long_audio_refused(make):
    limits = DecodeLimits(max_audio_duration_s=0.5)
    with pytest.raises(LimitExceeded, match=r"the audio is 1\.0 s long; the limit is 0\.5 s") as info:
        decode_audio(make(1.0), 16000, limits)
    assert info.value.code == ErrorCode.RESOURCE_EXHAUSTED


def test_audio_rejects_other_kinds():
    with pytest.raises(MediaDecodeError, match="expected audio, got a PNG image"):
        decode_audio(make_png(), 16000, LIMITS)
    with pytest.raises(MediaDecodeError, match="the audio is empty"):
        decode_audio(b"", 16000, LIMITS)
    with pytest.raises(MediaDecodeError, match="expected audio, got data in an unrecognised format"):
        decode_audio(bytes(random.Random(1).randbytes(4000)), 16000, LIMITS)


def test_audio_rejects_corrupt_data():
    wav = make_wav(1.0)
    with pytest.raises(MediaDecodeError):
        decode_audio(wav[:30], 16000, LIMITS)  # header cut short
    with pytest.raises(MediaDecodeError, match="could not decode an MP4 file"):
        decode_audio(make_m4a()[:200], 16000, LIMITS)


def test_audio_needs_a_positive_rate():
    with pytest.raises(InvalidInput, match="must be positive"):
        decode_audio(make_wav(0.1), 0, LIMITS)


# --------------------------------------------------------------------------------------------- image


@pytest.mark.parametrize("make", [make_png, make_jpeg, make_webp, make_gif, make_bmp, make_tiff])
def test_decode_image_formats(make):
    image = decode_image(make(32, 24), LIMITS)
    assert image.pixels.shape == (24, 32, 3) and image.pixels.dtype == np.uint8
    assert (image.width, image.height) == (32, 24)
    expected = np.asarray(gradient_image(32, 24), dtype=np.int16)
    tolerance = 24 if make is make_gif else 8  # GIF is palettised (web palette), JPEG is lossy
    assert np.abs(image.pixels.astype(np.int16) - expected).mean() < tolerance


def test_exif_orientation_applied():
    image = decode_image(make_jpeg(40, 20, exif_orientation=6), LIMITS)
    assert (image.width, image.height) == (20, 40)
    # Orientation 6 shows the image turned 90 degrees clockwise: the stored bottom-left corner (red 0,
    # green 255) is now top-left, the stored top-left corner (red 0, green 0) top-right.
    assert np.abs(image.pixels[0, 0].astype(int) - (0, 255, 64)).max() < 16
    assert np.abs(image.pixels[0, -1].astype(int) - (0, 0, 64)).max() < 16


def _encoded(image: PILImage.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("image", "fmt", "top_left", "bottom_right"),
    [
        (gradient_image(8, 6, "RGBA"), "PNG", (0, 0, 64), (255, 255, 64)),
        (PILImage.new("RGBA", (8, 6), (10, 20, 30, 0)), "PNG", (255, 255, 255), (255, 255, 255)),  # on white
        (gradient_image(8, 6, "L"), "PNG", (7, 7, 7), (233, 233, 233)),
        (gradient_image(8, 6, "P"), "PNG", (0, 0, 51), (255, 255, 51)),
        (
            PILImage.fromarray(np.full((6, 8), 65535, dtype=np.uint16)),
            "PNG",
            (255, 255, 255),
            (255, 255, 255),
        ),
        (
            PILImage.fromarray(np.full((6, 8), 32896, dtype=np.uint16)),
            "PNG",
            (128, 128, 128),
            (128, 128, 128),
        ),
        (gradient_image(8, 6, "CMYK"), "TIFF", (0, 0, 64), (255, 255, 64)),
        (gradient_image(8, 6, "1"), "PNG", (0, 0, 0), (255, 255, 255)),
    ],
    ids=["rgba", "transparent", "gray", "palette", "gray16-max", "gray16-mid", "cmyk", "bilevel"],
)
def test_image_modes_become_rgb(image, fmt, top_left, bottom_right):
    pixels = decode_image(_encoded(image, fmt), LIMITS).pixels
    assert pixels.shape == (6, 8, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels[0, 0].astype(int) - top_left).max() <= 2
    assert np.abs(pixels[-1, -1].astype(int) - bottom_right).max() <= 2


def _png_declaring(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR (CRC fixed up) claims ``width`` x ``height``."""
    png = bytearray(make_png(4, 4))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (100_000, 100_000)])
def test_huge_declared_image_refused_before_decoding(width, height):
    # The pixel data is only 4x4, so decoding would fail with a decode error; a LimitExceeded shows the
    # header alone was used.
    with pytest.raises(LimitExceeded, match="the limit is 64000000 pixels") as info:
        decode_image(_png_declaring(width, height), LIMITS)
    assert str(width * height) in str(info.value)


def test_pixel_limit_applies():
    with pytest.raises(LimitExceeded, match=r"32x24 = 768 pixels; the limit is 700 pixels"):
        decode_image(make_png(32, 24), DecodeLimits(max_image_pixels=700))


def test_image_rejects_bad_input():
    with pytest.raises(MediaDecodeError, match="expected an image, got WAV audio"):
        decode_image(make_wav(0.1), LIMITS)
    with pytest.raises(MediaDecodeError, match="the image is empty"):
        decode_image(b"", LIMITS)
    with pytest.raises(MediaDecodeError, match="could not decode a PNG image"):
        decode_image(make_png(64, 64)[:120], LIMITS)  # truncated
    png = bytearray(make_png(64, 64))
    png[60:80] = b"\x00" * 20  # corrupt the compressed data
    with pytest.raises(MediaDecodeError, match="could not decode a PNG image"):
        decode_image(bytes(png), LIMITS)


# --------------------------------------------------------------------------------------------- video


def _assert_frames_match_times(video, source_fps: int = 10) -> None:
    for frame, t in zip(video.frames, video.timestamps_s, strict=True):
        index = round(t * source_fps)
        assert np.abs(frame[4, 4].astype(int) - frame_color(index)).max() <= 8, (t, frame[4, 4])


@pytest.mark.parametrize("make", [make_mp4, make_webm], ids=["mp4-h264", "webm-vp9"])
def test_video_sampled_at_requested_fps(make):
    video = decode_video(make(2.0, fps=10, with_audio=False), 4.0, False, 16000, LIMITS)
    assert video.frames.shape == (8, 48, 64, 3) and video.frames.dtype == np.uint8
    # First source frame at or after each k/4 s; source frames are 0.1 s apart.
    assert video.timestamps_s == pytest.approx([0.0, 0.3, 0.5, 0.8, 1.0, 1.3, 1.5, 1.8])
    assert video.sampled_fps == 4.0
    assert video.source_fps == pytest.approx(10.0)
    assert video.duration_s == pytest.approx(2.0, abs=0.02)
    assert video.source_num_frames == 20
    assert video.audio is None
    _assert_frames_match_times(video)


def test_video_source_rate_when_fps_not_given_or_too_high():
    data = make_mp4(2.0, fps=10, with_audio=False)
    for fps in (None, 30.0):
        video = decode_video(data, fps, False, 16000, LIMITS)
        assert video.num_frames == 20
        assert video.sampled_fps == pytest.approx(10.0)
        assert video.timestamps_s == pytest.approx([i / 10 for i in range(20)])
        _assert_frames_match_times(video)


def test_video_source_rate_capped_by_max_frames():
    video = decode_video(
        make_mp4(2.0, fps=10, with_audio=False), None, False, 16000, DecodeLimits(max_video_frames=5)
    )
    assert video.num_frames == 5
    assert video.sampled_fps == pytest.approx(2.5)
    assert video.timestamps_s == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6])
    _assert_frames_match_times(video)


def test_video_too_many_frames_refused():
    with pytest.raises(
        LimitExceeded, match=r"sampling 2\.0 s of video at 10 fps gives 20 frames; the limit is 8"
    ):
        decode_video(
            make_mp4(2.0, fps=10, with_audio=False), 10.0, False, 16000, DecodeLimits(max_video_frames=8)
        )


def test_video_too_long_refused():
    with pytest.raises(LimitExceeded, match=r"the video is 2\.0 s long; the limit is 1\.5 s"):
        decode_video(
            make_mp4(2.0, with_audio=False), 1.0, False, 16000, DecodeLimits(max_video_duration_s=1.5)
        )


@pytest.mark.parametrize("make", [make_mp4, make_webm], ids=["mp4-aac", "webm-opus"])
def test_video_audio_track_extracted(make):
    video = decode_video(make(2.0, fps=10, freq=660.0), 2.0, True, 16000, LIMITS)
    assert video.num_frames == 4
    assert video.audio is not None
    assert video.audio.sample_rate == 16000
    assert video.audio.samples.dtype == np.float32 and video.audio.samples.ndim == 1
    assert video.audio.duration_s == pytest.approx(2.0, abs=0.05)
    assert abs(peak_frequency(video.audio.samples, 16000) - 660.0) < 5.0


def test_video_without_audio_track_errors_clearly():
    data = make_mp4(1.0, with_audio=False)
    with pytest.raises(InvalidInput, match="the video has no audio track") as info:
        decode_video(data, 2.0, True, 16000, LIMITS)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert decode_video(data, 2.0, False, 16000, LIMITS).audio is None


def test_video_rejects_bad_input():
    with pytest.raises(MediaDecodeError, match="expected video, got WAV audio"):
        decode_video(make_wav(0.1), 1.0, False, 16000, LIMITS)
    with pytest.raises(MediaDecodeError, match="expected video, got a JPEG image"):
        decode_video(make_jpeg(), 1.0, False, 16000, LIMITS)
    with pytest.raises(MediaDecodeError, match="the video is empty"):
        decode_video(b"", 1.0, False, 16000, LIMITS)
    mp4 = make_mp4(1.0)
    with pytest.raises(MediaDecodeError, match="could not decode an MP4 file"):
        decode_video(mp4[: len(mp4) // 2], 1.0, False, 16000, LIMITS)  # the index (moov) is at the end
    with pytest.raises(MediaDecodeError, match="has no video stream"):
        decode_video(make_m4a(0.5), 1.0, False, 16000, LIMITS)
    with pytest.raises(InvalidInput, match="positive number of frames per second"):
        decode_video(mp4, 0.0, False, 16000, LIMITS)


# ---------------------------------------------------------------------------- malformed input, broadly


def _damaged_copies(data: bytes, rng: random.Random, count: int) -> list[bytes]:
    copies = []
    for i in range(count):
        if i % 2 == 0:
            copies.append(data[: rng.randrange(0, len(data))])
        else:
            damaged = bytearray(data)
            for _ in range(rng.randrange(1, 16)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            copies.append(bytes(damaged))
    return copies


@pytest.mark.filterwarnings("ignore")
def test_damaged_media_only_raises_omnigate_errors():
    rng = random.Random(1234)
    sources = [
        make_wav(0.3),
        make_flac(0.3),
        make_ogg(0.3),
        make_mp3(0.3),
        make_m4a(0.3),
        make_png(),
        make_jpeg(),
        make_webp(lossless=False),
        make_gif(),
        make_bmp(),
        make_tiff(),
        make_mp4(0.5, w=32, h=32),
        make_webm(0.5, w=32, h=32),
    ]
    decoders = [
        lambda d: decode_audio(d, 16000, LIMITS),
        lambda d: decode_image(d, LIMITS),
        lambda d: decode_video(d, 4.0, True, 16000, LIMITS),
    ]
    for source in sources:
        for damaged in _damaged_copies(source, rng, 16):
            for decode in decoders:
                try:
                    decode(damaged)
                except OmnigateError:
                    pass  # a clear, typed error is the point; succeeding on lightly damaged data is fine too
