"""A realtime session's audio conversions: the client's 16-bit PCM in and out at 24 kHz, the model's rates.

User audio is kept as float32 at 24 kHz while it is buffered, then resampled (soxr HQ) to the model's
input rate and stored as a 16-bit WAV when it becomes an item: a request carries it inline, and the
gateway's media path decodes it like any other audio. The worker's speech (16-bit PCM at the model's
output rate, maybe several channels) goes back to the client as 16-bit mono PCM at 24 kHz.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from omnigate_gateway.realtime.events import AUDIO_RATE

PCM16_SCALE = 32768.0


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    """16-bit little-endian PCM as float32 in [-1, 1) (an even number of bytes)."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / PCM16_SCALE


def float_to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 32767 / PCM16_SCALE) * PCM16_SCALE).astype("<i2").tobytes()


def wav_for_model(samples: np.ndarray, model_rate: int) -> bytes:
    """24 kHz float samples as a 16-bit mono WAV at the model's input rate (unchanged rate when 0)."""
    rate = model_rate or AUDIO_RATE
    if rate != AUDIO_RATE:
        samples = soxr.resample(samples, AUDIO_RATE, rate, quality="HQ").astype(np.float32, copy=False)
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class OutputAudio:
    """One response's speech, chunk by chunk, as 16-bit mono PCM at 24 kHz (a resampling stream when the
    model speaks at another rate, so that chunk edges leave no clicks)."""

    def __init__(self) -> None:
        self._stream: soxr.ResampleStream | None = None
        self._rate = 0

    def convert(self, pcm: bytes, rate: int, channels: int) -> bytes:
        rate = rate or AUDIO_RATE
        channels = max(1, channels)
        if rate == AUDIO_RATE and channels == 1:
            return pcm
        samples = pcm16_to_float(pcm[: len(pcm) - len(pcm) % (2 * channels)])
        if channels > 1:
            samples = samples.reshape(-1, channels).mean(axis=1)
        if rate != AUDIO_RATE:
            if self._stream is None or rate != self._rate:
                self._stream, self._rate = soxr.ResampleStream(rate, AUDIO_RATE, 1, dtype="float32"), rate
            samples = self._stream.resample_chunk(samples)
        return float_to_pcm16(samples)

    def flush(self) -> bytes:
        """What the resampler still holds at the end of the speech."""
        if self._stream is None:
            return b""
        return float_to_pcm16(self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
