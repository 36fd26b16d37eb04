"""Decoding audio, images and video from generated media, and refusing bad or oversized input clearly."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image as PILImage

from omnigate.media import DecodeLimits
from omnigate_gateway.errors import (
    ErrorCode,
    InvalidInput,
    LimitExceeded,
    MediaDecodeError,
    OmnigateError,
)
from omnigate_gateway.media.audio import decode_audio
from omnigate_gateway.media.image import decode_image
from omnigate_gateway.media.sniff import sniff
from omnigate_gateway.media.video import decode_video
from tests.support.media_factory import (
    frame_color,
    gradient_image,
    make_aac,
    make_animated_gif,
    make_bmp,
    make_cmyk_jpeg,
    make_flac,
    make_gif,
    make_jpeg,
    make_m4a,
    make_mp3,
    make_mp4,
    make_ogg,
    make_opus,
    make_png,
    make_png16,
    make_tiff,
    make_video,
    make_wav,
    make_webm,
    make_webm_audio,
    make_webp,
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


def _wav_only_ffmpeg_reads(
    channels: int, levels: np.ndarray, rate: int = 16000, seconds: float = 0.3
) -> bytes:
    """16-bit PCM, each channel a constant level, behind a nameless chunk: libsndfile refuses the file ("no
    'data' chunk marker"), so it is decoded by FFmpeg (PyAV), the path the fuzzer crashed in."""
    frames = int(rate * seconds)
    pcm = (np.tile(levels, (frames, 1)) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    body = b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"\x01\x00\x00\x00" + struct.pack("<I", 0)
    body += b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("channels", [1, 2, 8, 9, 17, 64])
def test_many_channel_audio_through_ffmpeg_is_averaged(channels):
    # PyAV's planar to_ndarray crashed the process past 8 channels (fuzzer finding: a 17-channel PCM WAV).
    levels = np.linspace(0.05, 0.6, channels).astype(np.float32)
    data = _wav_only_ffmpeg_reads(channels, levels)
    with pytest.raises(Exception, match="data"):
        import soundfile

        soundfile.SoundFile(io.BytesIO(data))
    audio = decode_audio(data, 16000, LIMITS)
    assert audio.samples.shape == (4800,)
    np.testing.assert_allclose(audio.samples, levels.mean(), atol=2e-4)


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


# ------------------------------------------------------------------------------- more formats, in full


@pytest.mark.parametrize(
    ("container", "codec"),
    [
        ("mp4", "h264"),
        ("mp4", "h264-bframes"),
        ("mp4", "h265"),
        ("mp4", "av1"),
        ("mov", "h264"),
        ("mov", "h265"),
        ("mkv", "h264"),
        ("mkv", "h265"),
        ("mkv", "vp9"),
        ("webm", "vp8"),
        ("webm", "vp9"),
        ("webm", "av1"),
    ],
)
def test_video_containers_and_codecs(container, codec):
    data = make_video(container, codec, seconds=2.0, fps=10, freq=550.0)
    video = decode_video(data, 4.0, True, 16000, LIMITS)
    assert video.timestamps_s == pytest.approx([0.0, 0.3, 0.5, 0.8, 1.0, 1.3, 1.5, 1.8])
    assert video.frames.shape == (8, 48, 64, 3)
    for frame, t in zip(video.frames, video.timestamps_s, strict=True):  # away from the white corner
        assert np.abs(frame[30, 40].astype(int) - frame_color(round(t * 10))).max() <= 10, (t, frame[30, 40])
    assert video.audio is not None and video.audio.duration_s == pytest.approx(2.0, abs=0.06)
    assert abs(peak_frequency(video.audio.samples, 16000) - 550.0) < 5.0


@pytest.mark.parametrize(
    "make", [make_opus, make_webm_audio, make_aac], ids=["ogg-opus", "webm-opus", "adts-aac"]
)
def test_more_audio_formats(make):
    audio = decode_audio(make(1.0), 16000, LIMITS)
    assert audio.duration_s == pytest.approx(1.0, abs=0.06)
    assert abs(peak_frequency(audio.samples, 16000) - 440.0) < 5.0


def test_sixteen_bit_png_cmyk_jpeg_and_animated_gif():
    gray = decode_image(make_png16(32, 24), LIMITS).pixels
    assert (
        gray.shape == (24, 32, 3) and gray[0, 0].tolist() == [0, 0, 0] and gray[0, -1].tolist() == [255] * 3
    )
    cmyk = decode_image(make_cmyk_jpeg(32, 24), LIMITS).pixels
    assert np.abs(cmyk.astype(int) - np.asarray(gradient_image(32, 24), dtype=int)).mean() < 8
    first = decode_image(make_animated_gif(32, 24), LIMITS).pixels  # the first frame, not the black ones
    assert first.mean() > 40


@pytest.mark.parametrize(
    ("rotation", "corner"),
    [(0, (0, 0)), (90, (-1, 0)), (-90, (0, -1)), (180, (-1, -1))],
)
def test_video_rotation_metadata_is_applied(rotation, corner):
    data = make_video("mp4", "h264", seconds=1.0, fps=10, w=64, h=32, rotation=rotation, with_audio=False)
    frame = decode_video(data, 2.0, False, 16000, LIMITS).frames[0]
    assert frame.shape == ((32, 64, 3) if rotation % 180 == 0 else (64, 32, 3))
    # The stored frame has a white top-left corner; after turning it upright it is at ``corner``.
    assert frame[corner].min() > 230
    for other in {(0, 0), (0, -1), (-1, 0), (-1, -1)} - {corner}:
        assert frame[other].min() < 200, other


def test_variable_frame_rate_uses_timestamps():
    times = [0.0, 0.05, 0.1, 0.5, 0.55, 1.5, 1.6, 1.9]
    data = make_video("mp4", "h264", fps=10, frame_times=times, with_audio=False)
    video = decode_video(data, 4.0, False, 16000, LIMITS)
    assert video.timestamps_s == pytest.approx([0.0, 0.5, 1.5, 1.9])  # first frame at or after k/4 s
    for frame, index in zip(video.frames, (0, 3, 5, 7), strict=True):
        assert np.abs(frame[30, 40].astype(int) - frame_color(index)).max() <= 8


def test_min_frames_raises_the_rate_for_short_clips():
    data = make_mp4(1.0, fps=10, with_audio=False)
    video = decode_video(data, 1.0, False, 16000, DecodeLimits(min_video_frames=4))
    assert video.num_frames == 4 and video.sampled_fps == pytest.approx(4.0)


def test_frame_size_limit_from_the_header():
    with pytest.raises(LimitExceeded, match=r"frames are 64x48 = 3072 pixels; the limit is 3000"):
        decode_video(
            make_mp4(0.5, with_audio=False), 2.0, False, 16000, DecodeLimits(max_video_frame_pixels=3000)
        )


def test_wav_header_declaring_hours_is_refused():
    wav = bytearray(make_wav(0.1, 16000))
    data = wav.index(b"data")
    wav[data + 4 : data + 8] = struct.pack("<I", 36000 * 16000 * 2)
    with pytest.raises(LimitExceeded, match=r"36000\.0 s long; the limit is 600 s"):
        decode_audio(bytes(wav), 16000, LIMITS)


@pytest.mark.parametrize("fit", [0, 5000])
def test_video_fit_pixels(fit):
    video = decode_video(
        make_mp4(1.0, w=320, h=240, with_audio=False), 2.0, False, 16000, LIMITS, fit_pixels=fit
    )
    assert video.frames.shape[1:3] == ((240, 320) if fit == 0 else (61, 81))
    assert np.abs(video.frames[0][30, 40].astype(int) - frame_color(0)).max() <= 8


def test_jpeg_is_decoded_at_reduced_scale_when_it_must_shrink():
    data = make_jpeg(4000, 3000)
    full = decode_image(data, LIMITS)
    small = decode_image(data, LIMITS, fit_pixels=50000)
    assert full.pixels.shape == (3000, 4000, 3)
    assert small.pixels.shape == (193, 258, 3)
    # Same picture: compare with the full decode shrunk the ordinary way.
    reference = np.asarray(PILImage.fromarray(full.pixels).resize((258, 193), PILImage.Resampling.BICUBIC))
    assert np.abs(small.pixels.astype(int) - reference.astype(int)).mean() < 3


# ----------------------------------------------------------------------- sampling skips what it can


def _naive_sample(data: bytes, fps: float) -> tuple[list[float], np.ndarray]:
    """Decode every frame, then pick the first frame at or after each target (the reference)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [
            (float(f.pts * f.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(stream)
        ]
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = container.duration / av.time_base
    frames.sort(key=lambda item: item[0])
    times, picked, target = [], [], 0
    while target / fps < duration - 1e-3:
        t, pixels = next(((t, p) for t, p in frames if t + 1e-3 >= target / fps), (None, None))
        if t is None:
            break
        times.append(round(t, 6))
        picked.append(pixels)
        target = int((t + 1e-3) * fps) + 1
    return times, np.stack(picked)


@pytest.mark.parametrize(
    ("codec", "gop", "fps"),
    [
        ("h264-bframes", 250, 2.0),
        ("h264-bframes", 10, 0.25),
        ("h265", 8, 0.5),
        ("vp9", 10, 0.3),
        ("h264", 5, 3.0),
    ],
)
def test_sampling_equals_decoding_everything(codec, gop, fps):
    """Skipping unreferenced frames and jumping to keyframes never changes which frames come out."""
    container = "webm" if codec == "vp9" else "mp4"
    data = make_video(container, codec, seconds=8.0, fps=10, w=64, h=48, gop=gop, with_audio=False)
    video = decode_video(data, fps, False, 16000, LIMITS)
    times, frames = _naive_sample(data, fps)
    assert video.timestamps_s == pytest.approx(times)
    assert np.array_equal(video.frames, frames)


def test_sparse_sampling_jumps_over_whole_groups_of_pictures():
    import av

    from omnigate_gateway.media.video import _plan_decoding

    data = make_video("mp4", "h264", seconds=8.0, fps=10, gop=10, with_audio=False)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
    times = [float(p.pts * p.time_base) for p in packets]
    plan = _plan_decoding(packets, times, 0.25, 2)  # frames at 0 s and 4 s
    assert plan is not None and sorted(plan.sampled) == [0, 40]
    assert plan.jumps == {1: 40}  # after frame 0, straight to the keyframe at 4 s


# ------------------------------------------------------------------------------------- stopping early


@pytest.mark.parametrize("kind", ["audio", "image", "video"])
def test_a_cancelled_stop_signal_stops_every_decoder(kind):
    from omnigate_gateway.errors import DecodeCancelled
    from omnigate_gateway.media.cancellation import StopSignal

    stop = StopSignal()
    stop.cancel()
    with pytest.raises(DecodeCancelled):
        if kind == "audio":
            decode_audio(make_wav(1.0), 16000, LIMITS, stop=stop)
        elif kind == "image":
            decode_image(make_png(), LIMITS, stop=stop)
        else:
            decode_video(make_mp4(0.5), 2.0, True, 16000, LIMITS, stop=stop)


def test_a_passed_deadline_stops_decoding():
    import time

    from omnigate_gateway.errors import MediaDecodeTimeout
    from omnigate_gateway.media.cancellation import StopSignal

    stop = StopSignal(time.monotonic() - 1, what="decoding the video", limit="the decode time limit of 1 s")
    with pytest.raises(MediaDecodeTimeout, match="decoding the video ran past the decode time limit of 1 s"):
        decode_video(make_mp4(0.5), 2.0, False, 16000, LIMITS, stop=stop)


class FakeRangesThatLoseAFrame:
    """A fake of ``video._decode_segments`` (the parallel range decoders) that lost a sampled frame, as on
    a damaged stream: it decodes nothing and answers None. Counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return None


def test_sequential_fallback_when_a_range_misses_a_frame(monkeypatch):
    """If parallel decoding of the ranges loses a sampled frame (a damaged stream), decoding is redone in
    order, with the same result."""
    from omnigate_gateway.media import video

    def fake_four_cores() -> int:
        """A fake of ``video._parallel_decoders``: four range decoders, whatever this machine's cores."""
        return 4

    monkeypatch.setattr(video, "_parallel_decoders", fake_four_cores)
    data = make_video("mp4", "h264-bframes", seconds=6.0, fps=10, gop=10, with_audio=False)
    expected = decode_video(data, 2.0, False, 16000, LIMITS)
    ranges = FakeRangesThatLoseAFrame()
    monkeypatch.setattr(video, "_decode_segments", ranges)
    converted = []  # frames the in-order loop turned into RGB (the ranges decoded none)
    real_upright_rgb = video._upright_rgb
    monkeypatch.setattr(video, "_upright_rgb", lambda *a: converted.append(1) or real_upright_rgb(*a))
    again = decode_video(data, 2.0, False, 16000, LIMITS)
    assert ranges.calls == 1, "the video was not split into ranges: the fallback was not exercised"
    assert len(converted) == len(again.frames) == len(expected.frames) == 12
    assert again.timestamps_s == expected.timestamps_s
    assert np.array_equal(again.frames, expected.frames)


def test_video_ranges_start_only_where_later_frames_can_be_reached():
    from omnigate_gateway.media.video import _DecodePlan, _segments

    # Sampled packets 5, 25, 45 reach back to keyframes 0, 20, 40; packet 42 is a leading picture that
    # needs keyframe 20 (shown before keyframe 40), so no range may start at 40.
    plan = _DecodePlan(frozenset({5, 25, 42, 45}), 45, {}, {5: 0, 25: 20, 42: 20, 45: 40})
    assert _segments(plan, 4) == [(0, 20), (20, 46)]
    assert _segments(plan, 1) == [(0, 46)]
