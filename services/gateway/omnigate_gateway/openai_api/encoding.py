"""Media in the answer's formats: 16-bit PCM as WAV (whole, or a header for a stream of unknown length), a
generated image as PNG, JPEG or WebP at the requested size, and speech in ``/v1/audio/speech``'s formats as
it arrives (``SpeechEncoder``: WAV, raw PCM, and MP3, Ogg Opus, AAC and FLAC through PyAV)."""

from __future__ import annotations

import contextlib
import io
import struct
import wave
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway.openai_api.protocol import IMAGE_OUTPUT_FORMATS


def wav_header(sample_rate: int, channels: int, data_bytes: int | None) -> bytes:
    """A 44-byte PCM 16-bit WAV header; ``data_bytes=None`` writes the 0xFFFFFFFF sizes of a WAV stream of
    unknown length (what ffmpeg writes to a pipe; libsndfile, ffmpeg, browsers and Python's wave read it)."""
    size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    block = channels * 2
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
        + b"data"
        + struct.pack("<I", size)
    )


def wav_bytes(pcm: bytes, sample_rate: int, channels: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buffer.getvalue()


def image_result(
    image: gw.GeneratedImage, output_format: str, size: tuple[int, int] | None
) -> tuple[bytes, int, int]:
    """The generated image in the requested format and size (Pillow; PNG as generated needs no work)."""
    if output_format == "png" and size is None and image.mime_type == "image/png":
        return image.data, image.width, image.height
    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as opened:
        picture = opened.convert("RGB")
        if size is not None and picture.size != size:
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        picture.save(out, format=IMAGE_OUTPUT_FORMATS[output_format])
        return out.getvalue(), picture.width, picture.height


@dataclass(frozen=True)
class SpeechEncoding:
    """How ``/v1/audio/speech`` answers one ``response_format``: its Content-Type, and for a compressed
    format the FFmpeg muxer, encoder and bit rate (None: the encoder's own; FLAC is lossless)."""

    content_type: str
    container: str | None = None
    codec: str | None = None
    bit_rate: int | None = None
    streamed: bool = True  # False: encoded as the audio arrives, sent whole at the end
    options: tuple[tuple[str, str], ...] = ()  # muxer options


SPEECH_ENCODINGS = {
    "wav": SpeechEncoding("audio/wav"),
    "pcm": SpeechEncoding("audio/pcm"),
    "mp3": SpeechEncoding("audio/mpeg", "mp3", "libmp3lame", 64_000),
    # Ogg Opus; a page every 100 ms (the muxer's default waits for a second of audio before it writes one)
    "opus": SpeechEncoding("audio/ogg", "ogg", "libopus", 32_000, options=(("page_duration", "100000"),)),
    "aac": SpeechEncoding("audio/aac", "adts", "aac", 64_000),
    # FLAC's header holds the stream's length, written when the stream ends: a FLAC sent as it is made says
    # "length unknown", which libsndfile (soundfile) refuses to read. So FLAC is sent whole.
    "flac": SpeechEncoding("audio/flac", "flac", "flac", streamed=False),
}


class SpeechEncoder:
    """16-bit PCM chunks (the worker's speech) in one of ``SPEECH_ENCODINGS``' formats, chunk by chunk:
    ``encode`` returns the bytes ready to send so far (maybe none), ``finish`` the rest.

    ``pcm`` is the samples as they come (16-bit little-endian, the model's rate and channels); ``wav`` the
    same after a header for a stream of unknown length (``wav_header``); the compressed formats go through
    PyAV's encoder and muxer as they arrive (FFmpeg resamples to a rate the codec takes when the model's is
    not one). ``default_rate`` is the header's rate when no audio came at all (an empty but valid file).
    Not thread-safe; ``blocking`` says whether a call does encoding work (run it off the event loop)."""

    def __init__(self, response_format: str, default_rate: int = 24000) -> None:
        self.encoding = SPEECH_ENCODINGS[response_format]
        self.format = response_format
        self.blocking = self.encoding.codec is not None
        self._default_rate = default_rate or 24000
        self._started = False
        self._container: av.container.OutputContainer | None = None
        self._stream: av.audio.stream.AudioStream | None = None
        self._sink: _Sink | io.BytesIO = _Sink() if self.encoding.streamed else io.BytesIO()
        self._samples = 0

    def encode(self, pcm: bytes, sample_rate: int, channels: int) -> bytes:
        rate, channels = sample_rate or self._default_rate, channels or 1
        if self.encoding.codec is None:
            if self.format == "wav" and not self._started:
                self._started = True
                return wav_header(rate, channels, None) + pcm
            return pcm
        if self._stream is None:
            self._open(rate, channels)
        assert self._container is not None and self._stream is not None
        samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % (2 * channels)], dtype="<i2")
        if samples.size:
            frame = av.AudioFrame.from_ndarray(
                samples.reshape(1, -1), format="s16", layout="mono" if channels == 1 else "stereo"
            )
            frame.sample_rate = rate
            frame.time_base = Fraction(1, rate)
            frame.pts = self._samples
            self._samples += samples.size // channels
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._take()

    def finish(self) -> bytes:
        """The end of the file: a WAV header when no audio came, the encoder's last frames, the trailer."""
        if self.encoding.codec is None:
            if self.format == "wav" and not self._started:
                self._started = True
                return wav_header(self._default_rate, 1, 0)
            return b""
        if self._stream is None:
            self._open(self._default_rate, 1)
        assert self._container is not None and self._stream is not None
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        if isinstance(self._sink, io.BytesIO):
            return self._sink.getvalue()
        return self._take()

    def close(self) -> None:
        """Frees the encoder when the answer ends early (the client left, the generation failed)."""
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()

    def _open(self, rate: int, channels: int) -> None:
        encoding = self.encoding
        assert encoding.container is not None and encoding.codec is not None
        # flush_packets: each packet reaches the sink as soon as it is muxed
        options = {"flush_packets": "1", **dict(encoding.options)}
        self._container = av.open(self._sink, mode="w", format=encoding.container, options=options)
        supported = av.Codec(encoding.codec, "w").audio_rates
        if supported and rate not in supported:
            rate = min((r for r in supported if r >= rate), default=max(supported))
        stream = self._container.add_stream(
            encoding.codec, rate=rate, layout="mono" if channels == 1 else "stereo"
        )
        assert isinstance(stream, av.audio.stream.AudioStream)
        if encoding.bit_rate:
            stream.codec_context.bit_rate = encoding.bit_rate
        self._stream = stream

    def _take(self) -> bytes:
        return self._sink.take() if isinstance(self._sink, _Sink) else b""


class _Sink:
    """A write-only file for PyAV's muxer (not seekable: FFmpeg writes a stream's bytes once, in order)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data
