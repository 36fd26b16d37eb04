"""Real media files generated in memory for tests, with content that tests can check.

Audio is a sine tone at a known frequency (in stereo, the right channel is the same tone at half
amplitude). Video frame ``i`` is a solid colour whose level encodes its index (see ``frame_color``), so a
test can tell which source frame a sampled frame came from.
"""

from __future__ import annotations

import contextlib
import io
import os
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


# ------------------------------------------------------------------------ more formats (ingestion tests)

# Encoder settings per video codec: fast, high quality (frame colours survive), quiet.
VIDEO_CODECS = {
    "h264": ("libx264", {"preset": "ultrafast", "crf": "18", "tune": "zerolatency"}),
    "h264-bframes": ("libx264", {"preset": "veryfast", "crf": "18"}),  # B-frames, like most real files
    "h265": ("libx265", {"preset": "ultrafast", "crf": "18", "x265-params": "log-level=none"}),
    "vp8": ("libvpx", {"deadline": "realtime", "cpu-used": "8", "crf": "8", "b": "2M"}),
    "vp9": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}),
    "av1": ("libsvtav1", {"preset": "12", "crf": "10"}),
}
# Container (PyAV format name) and its audio codec and rate.
VIDEO_CONTAINERS = {
    "mp4": ("mp4", "aac", 44100),
    "mov": ("mov", "aac", 44100),
    "mkv": ("matroska", "aac", 44100),
    "webm": ("webm", "libopus", 48000),
}


def make_video(
    container: str = "mp4",
    codec: str = "h264",
    *,
    seconds: float = 2.0,
    fps: int = 10,
    w: int = 64,
    h: int = 48,
    with_audio: bool = True,
    freq: float = 440.0,
    rotation: int = 0,
    gop: int | None = None,
    frame_times: list[float] | None = None,
) -> bytes:
    """A video of solid-colour frames (frame ``i`` is ``frame_color(i)``) in any container and codec.

    ``rotation`` stores a display matrix (degrees counter-clockwise, as phones do for portrait clips);
    ``gop`` sets the keyframe interval; ``frame_times`` (seconds, increasing) gives a variable frame rate
    instead of ``fps`` (frame ``i`` is shown at ``frame_times[i]``).
    """
    fmt, audio_codec, audio_rate = VIDEO_CONTAINERS[container]
    encoder, options = VIDEO_CODECS[codec]
    if encoder == "libsvtav1":
        os.environ.setdefault("SVT_LOG", "0")  # SVT-AV1 prints its configuration to stderr otherwise
    options = dict(options)
    if gop is not None:
        options["g"] = str(gop)
        if encoder.startswith("libx26"):
            options["keyint_min"] = str(gop)
            options["sc_threshold"] = "0"
    if frame_times is not None:
        time_base, pts = Fraction(1, 1000), [round(t * 1000) for t in frame_times]
        seconds = frame_times[-1] + 1.0 / fps
    else:
        time_base, pts = Fraction(1, fps), list(range(int(round(seconds * fps))))
    buf = io.BytesIO()
    with _keep_scheduling_policy(), av.open(buf, mode="w", format=fmt) as out:
        vstream = out.add_stream(encoder, rate=fps, options=options)
        vstream.width, vstream.height, vstream.pix_fmt = w, h, "yuv420p"
        if frame_times is not None:
            vstream.codec_context.time_base = time_base
        if rotation:
            vstream.set_display_rotation(rotation)
        astream = _add_audio_stream(out, audio_codec, audio_rate, 2) if with_audio else None
        for i, p in enumerate(pts):
            rgb = np.empty((h, w, 3), dtype=np.uint8)
            rgb[:] = frame_color(i)
            rgb[: max(1, h // 4), : max(1, w // 4)] = 255  # a white top-left corner shows orientation
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = p
            frame.time_base = time_base
            for packet in vstream.encode(frame):
                out.mux(packet)
        for packet in vstream.encode(None):
            out.mux(packet)
        if astream is not None:
            _encode_tone(out, astream, seconds, audio_rate, 2, freq)
    return buf.getvalue()


@contextlib.contextmanager
def _keep_scheduling_policy():
    """Restores the calling thread's scheduling policy after encoding.

    SVT-AV1 (PyAV's AV1 encoder), when run as root, switches the thread that opens it to SCHED_FIFO
    priority 99. Left alone, that real-time policy is inherited by every process the test run starts
    afterwards (helm, prometheus, workers), which then starve the machine; so it is put back here.
    """
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if os.sched_getscheduler(0) != policy:
            os.sched_setscheduler(0, policy, param)


def make_mkv(seconds: float = 2.0, fps: int = 10, w: int = 64, h: int = 48, with_audio: bool = True) -> bytes:
    """H.264 + AAC in Matroska."""
    return make_video("mkv", "h264", seconds=seconds, fps=fps, w=w, h=h, with_audio=with_audio)


def make_mov(seconds: float = 2.0, fps: int = 10, w: int = 64, h: int = 48, with_audio: bool = True) -> bytes:
    """H.264 + AAC in QuickTime."""
    return make_video("mov", "h264", seconds=seconds, fps=fps, w=w, h=h, with_audio=with_audio)


def make_opus(seconds: float = 1.0, rate: int = 48000, channels: int = 1, freq: float = 440.0) -> bytes:
    """Ogg Opus."""
    return _soundfile_bytes(seconds, rate, channels, freq, "OGG", "OPUS")


def make_webm_audio(seconds: float = 1.0, rate: int = 48000, channels: int = 2, freq: float = 440.0) -> bytes:
    """Opus in an audio-only WebM."""
    return _pyav_audio_bytes(seconds, rate, channels, freq, "webm", "libopus")


def make_aac(seconds: float = 1.0, rate: int = 44100, channels: int = 2, freq: float = 440.0) -> bytes:
    """Raw AAC in ADTS frames (what .aac files hold)."""
    return _pyav_audio_bytes(seconds, rate, channels, freq, "adts", "aac")


def make_png16(w: int = 32, h: int = 24) -> bytes:
    """A 16-bit grayscale PNG (the gradient's red ramp scaled to 0..65535)."""
    ramp = (np.asarray(gradient_image(w, h), dtype=np.uint32)[:, :, 0] * 257).astype(np.uint16)
    return _image_bytes(Image.fromarray(ramp), "PNG")


def make_cmyk_jpeg(w: int = 32, h: int = 24) -> bytes:
    return _image_bytes(gradient_image(w, h, "CMYK"), "JPEG", quality=95)


def make_animated_gif(w: int = 32, h: int = 24, frames: int = 3) -> bytes:
    """An animated GIF whose first frame is the gradient and later frames are solid black."""
    first = gradient_image(w, h).convert("P")
    rest = [Image.new("P", (w, h), 0) for _ in range(frames - 1)]
    return _image_bytes(first, "GIF", save_all=True, append_images=rest, duration=100, loop=0)


def make_image(fmt: str, w: int = 32, h: int = 24) -> bytes:
    """The gradient image in any of: png, jpeg, webp, gif, bmp, tiff."""
    makers = {
        "png": make_png,
        "jpeg": make_jpeg,
        "webp": make_webp,
        "gif": make_gif,
        "bmp": make_bmp,
        "tiff": make_tiff,
    }
    return makers[fmt](w, h)


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


def make_video_with_audio(
    audio_seconds: float, seconds: float = 1.0, w: int = 64, h: int = 48, container: str = "mkv"
) -> bytes:
    """H.264 video with an AAC track of ``audio_seconds`` of tone, whatever the video's length.

    With 0, Matroska ("mkv") keeps an audio stream that holds no sample (MP4 drops the empty track).
    """
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=VIDEO_CONTAINERS[container][0]) as out:
        vstream = out.add_stream("libx264", rate=10, options=VIDEO_CODECS["h264"][1])
        vstream.width, vstream.height, vstream.pix_fmt = w, h, "yuv420p"
        astream = _add_audio_stream(out, "aac", 44100, 2)
        for i in range(int(round(seconds * 10))):
            rgb = np.empty((h, w, 3), dtype=np.uint8)
            rgb[:] = frame_color(i)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, 10)
            for packet in vstream.encode(frame):
                out.mux(packet)
        for packet in vstream.encode(None):
            out.mux(packet)
        _encode_tone(out, astream, audio_seconds, 44100, 2, 440.0)
    return buf.getvalue()
