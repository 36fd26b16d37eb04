"""Audio a voice-activity detector takes for speech, made offline: a voiced source with a moving pitch,
shaped by vowel formants that change every syllable, under a syllable-rate envelope.

Silero VAD (the gateway's server VAD) gives this over 0.9 for most 32 ms windows and a steady tone or
quiet noise under 0.1, so tests can script "the user speaks, then pauses" without recordings.
"""

from __future__ import annotations

import numpy as np

RATE = 24000  # Hz, the realtime API's audio rate

# (F1, F2, F3) in Hz of a, i, u, e, o
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (640, 1190, 2390))


def speech(seconds: float, rate: int = RATE, seed: int = 0, syllable_s: float = 0.2) -> np.ndarray:
    """Speech-like float32 samples in [-0.5, 0.5] (additive synthesis of the harmonics of the pitch)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    pitch = 130 + 25 * np.sin(2 * np.pi * 0.6 * t) + 6 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch / rate)
    syllables = int(np.ceil(seconds / syllable_s)) + 1
    targets = np.array([VOWELS[i] for i in rng.integers(len(VOWELS), size=syllables)], dtype=float)
    position = t / syllable_s
    formants = np.stack([np.interp(position, np.arange(syllables), targets[:, j]) for j in range(3)], axis=1)
    out = np.zeros(n)
    for harmonic in range(1, 40):
        frequency = harmonic * pitch
        gain = sum(
            1 / (1 + ((frequency - formants[:, j]) / (60 + 30 * j)) ** 2) / (j + 1) for j in range(3)
        ) * (frequency < rate / 2)
        out += gain * np.sin(harmonic * phase) / np.sqrt(harmonic)
    out *= np.abs(np.sin(np.pi * position)) ** 0.6
    out /= np.max(np.abs(out)) + 1e-9
    return (0.5 * out).astype(np.float32)


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples as 16-bit little-endian PCM (what the realtime API takes)."""
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def chunks(data: bytes, seconds: float = 0.1, rate: int = RATE) -> list[bytes]:
    """``data`` (16-bit PCM) cut as a microphone would send it."""
    size = int(seconds * rate) * 2
    return [data[i : i + size] for i in range(0, len(data), size)]
