"""Real media files generated in memory for tests, with content that tests can check.

Audio is a sine tone at a known frequency (in stereo, the right channel is the same tone at half
amplitude). Video frame ``i`` is a solid colour whose level encodes its index (see ``frame_color``), so a
test can tell which source frame a sampled frame came from.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import soundfile as sf
from PIL import Image


def tone(
    seconds: float, rate: int, channels: int = 1, freq: float = 440.0, amplitude: float = 0.5
) -> np.ndarray:
    """A sine tone as float32 samples, shape (n, channels)."""
    n = int(round(seconds * rate))
    t = np.arange(n, dtype=np.float64) / rate
    mono = amplitude * np.sin(2.0 * np.pi * freq * t)
    cols = [mono * (1.0 if c == 0 else 0.5) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def _soundfile_bytes(seconds, rate, channels, freq, fmt, subtype=None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, rate, channels, freq), rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def make_wav(seconds: float = 1.0, rate: int = 16000, channels: int = 1, freq: float = 440.0) -> bytes:
    return _soundfile_bytes(seconds, rate, channels, freq, "WAV", "PCM_16")


def make_flac(seconds: float = 1.0, rate: int = 16000, channels: int = 1, freq: float = 440.0) -> bytes:
    return _soundfile_bytes(seconds, rate, channels, freq, "FLAC", "PCM_16")


def make_ogg(seconds: float = 1.0, rate: int = 16000, channels: int = 1, freq: float = 440.0) -> bytes:
    """Ogg Vorbis."""
    return _soundfile_bytes(seconds, rate, channels, freq, "OGG", "VORBIS")


def make_mp3(seconds: float = 1.0, rate: int = 16000, channels: int = 1, freq: float = 440.0) -> bytes:
    if "MP3" in sf.available_formats():
        return _soundfile_bytes(seconds, rate, channels, freq, "MP3", "MPEG_LAYER_III")
    return _pyav_audio_bytes(seconds, rate, channels, freq, "mp3", "libmp3lame")


def make_m4a(seconds: float = 1.0, rate: int = 44100, channels: int = 2, freq: float = 440.0) -> bytes:
    """AAC audio in an MP4 container (soundfile cannot read it; the decoder falls back to PyAV)."""
    return _pyav_audio_bytes(seconds, rate, channels, freq, "mp4", "aac")


def _add_audio_stream(container, codec: str, rate: int, channels: int):
    stream = container.add_stream(codec, rate=rate)
    stream.codec_context.layout = "stereo" if channels == 2 else "mono"
    return stream


def _encode_tone(container, stream, seconds: float, rate: int, channels: int, freq: float) -> None:
    samples = tone(seconds, rate, channels, freq)  # (n, channels)
    chunk = 1024
    for start in range(0, len(samples), chunk):
        block = np.ascontiguousarray(samples[start : start + chunk].T)  # planar (channels, n)
        frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=stream.codec_context.layout.name)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def _pyav_audio_bytes(seconds, rate, channels, freq, container_format, codec) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as container:
        stream = _add_audio_stream(container, codec, rate, channels)
        _encode_tone(container, stream, seconds, rate, channels, freq)
    return buf.getvalue()


def _image_bytes(image: Image.Image, fmt: str, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def gradient_image(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """A left-to-right red ramp over a top-to-bottom green ramp (blue fixed at 64)."""
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None].repeat(w, 1)
    rgb = np.stack([x, y, np.full_like(x, 64)], axis=2).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def make_png(w: int = 32, h: int = 24, mode: str = "RGB") -> bytes:
    return _image_bytes(gradient_image(w, h, mode), "PNG")


def make_jpeg(w: int = 32, h: int = 24, exif_orientation: int | None = None) -> bytes:
    args = {"quality": 95}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation  # Orientation
        args["exif"] = exif.tobytes()
    return _image_bytes(gradient_image(w, h), "JPEG", **args)


def make_webp(w: int = 32, h: int = 24, lossless: bool = True) -> bytes:
    return _image_bytes(gradient_image(w, h), "WEBP", lossless=lossless)


def make_gif(w: int = 32, h: int = 24) -> bytes:
    return _image_bytes(gradient_image(w, h).convert("P"), "GIF")


def make_bmp(w: int = 32, h: int = 24) -> bytes:
    return _image_bytes(gradient_image(w, h), "BMP")


def make_tiff(w: int = 32, h: int = 24) -> bytes:
    return _image_bytes(gradient_image(w, h), "TIFF")


def frame_color(index: int) -> tuple[int, int, int]:
    """The colour of source frame ``index``: red rises by 4 per frame, green falls, blue is fixed."""
    level = 20 + (4 * index) % 216
    return (level, 255 - level, 96)


def _make_video(
    container_format: str,
    video_codec: str,
    video_options: dict[str, str],
    audio_codec: str,
    audio_rate: int,
    seconds: float,
    fps: int,
    w: int,
    h: int,
    with_audio: bool,
    freq: float,
) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as container:
        vstream = container.add_stream(video_codec, rate=fps, options=video_options)
        vstream.width, vstream.height, vstream.pix_fmt = w, h, "yuv420p"
        vstream.codec_context.thread_type = "AUTO"
        astream = _add_audio_stream(container, audio_codec, audio_rate, 2) if with_audio else None
        for i in range(int(round(seconds * fps))):
            rgb = np.empty((h, w, 3), dtype=np.uint8)
            rgb[:] = frame_color(i)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in vstream.encode(frame):
                container.mux(packet)
        for packet in vstream.encode(None):
            container.mux(packet)
        if astream is not None:
            _encode_tone(container, astream, seconds, audio_rate, 2, freq)
    return buf.getvalue()


def make_mp4(
    seconds: float = 2.0,
    fps: int = 10,
    w: int = 64,
    h: int = 48,
    with_audio: bool = True,
    freq: float = 440.0,
) -> bytes:
    """H.264 video (+ AAC stereo audio at 44.1 kHz)."""
    options = {"preset": "ultrafast", "crf": "18", "tune": "zerolatency"}
    return _make_video("mp4", "libx264", options, "aac", 44100, seconds, fps, w, h, with_audio, freq)


def make_webm(
    seconds: float = 2.0,
    fps: int = 10,
    w: int = 64,
    h: int = 48,
    with_audio: bool = True,
    freq: float = 440.0,
) -> bytes:
    """VP9 video (+ Opus stereo audio at 48 kHz)."""
    options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
    return _make_video("webm", "libvpx-vp9", options, "libopus", 48000, seconds, fps, w, h, with_audio, freq)


def write_samples(directory: str) -> list[str]:
    """Writes a small set of sample files (used by ``make demo-media`` for the README's examples)."""
    import pathlib

    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "sound.wav": make_wav(seconds=2.0, rate=44100, channels=2),
        "sound.mp3": make_mp3(seconds=2.0, rate=44100, channels=2),
        "picture.png": make_png(128, 96),
        "clip.mp4": make_mp4(seconds=4.0, fps=10, w=128, h=96, with_audio=True),
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    return sorted(str(out / name) for name in files)


if __name__ == "__main__":
    import sys

    for path in write_samples(sys.argv[1] if len(sys.argv) > 1 else "demo-media"):
        print(path)
