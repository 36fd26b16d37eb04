"""Speech streamed while it is generated: codec codes are turned into audio chunk by chunk.

Qwen2.5-Omni's talker produces codec codes one at a time and its token2wav (a DiT to mel, then BigVGAN)
turns codes into a waveform. ``generate`` only returns the waveform after the whole answer is
synthesized; this streamer receives the talker's codes as they are produced (``talker_streamer``) and
vocodes growing chunks of new codes (the first ``chunk_codes`` long), with ``context_codes`` of left context for continuity, so the
first audio arrives long before the end. transformers 5.23 still synthesizes the full waveform at the end
of ``generate`` (there is no way to stop it), so streaming costs that second pass; ``stream_speech=false``
turns streaming off and sends the final waveform instead.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from omnigate import tracing
from omnigate.conversation import AudioChunk
from omnigate_worker.engine import EventSink


class SpeechStreamer(BaseStreamer):
    def __init__(
        self,
        token2wav,
        speaker_params: dict,
        emit: EventSink,
        sample_rate: int,
        chunk_codes: int,
        context_codes: int,
        stop_codes: set[int],
        cancelled: threading.Event,
    ) -> None:
        self._token2wav = token2wav
        device = next(token2wav.parameters()).device
        self._conditioning = speaker_params["cond"].to(device).float()
        self._reference_mel = speaker_params["ref_mel"].to(device).float()
        self._device = device
        self._emit = emit
        self._rate = sample_rate
        self._chunk = chunk_codes
        self._context = context_codes
        self._stop = stop_codes
        self._cancelled = cancelled
        self._prompt_seen = False
        self._ended = False
        self.codes: list[int] = []
        self._sent = 0  # codes already turned into audio
        self.sequence = 0
        self.samples = 0

    @property
    def seconds(self) -> float:
        return self.samples / self._rate

    def put(self, value) -> None:
        if not self._prompt_seen:  # the talker's prompt comes first
            self._prompt_seen = True
            return
        for code in value.reshape(-1).tolist():
            if self._ended or code in self._stop:
                self._ended = True
                continue
            self.codes.append(int(code))
        while len(self.codes) - self._sent >= self._next_chunk() and not self._cancelled.is_set():
            self._vocode(self._sent + self._next_chunk())

    def _next_chunk(self) -> int:
        """The first chunk is small (early audio); each next one doubles, up to 8x, since every vocoder
        call has a fixed cost (the DiT's ODE steps) that small chunks would pay over and over."""
        return self._chunk * min(8, 2**self.sequence)

    def end(self) -> None:
        if len(self.codes) > self._sent and not self._cancelled.is_set():
            self._vocode(len(self.codes))

    def _vocode(self, upto: int) -> None:
        # A child of the request's current span on the engine thread (scheduler: worker.decode).
        with tracing.tracer(tracing.WORKER).start_as_current_span("worker.vocode") as span:
            span.set_attribute("omnigate.codes", upto - self._sent)
            span.set_attribute("omnigate.sequence", self.sequence)
            self._vocode_chunk(upto)

    def _vocode_chunk(self, upto: int) -> None:
        start = max(0, self._sent - self._context)
        codes = torch.tensor([self.codes[start:upto]], dtype=torch.long, device=self._device)
        wav = self._token2wav(codes, conditioning=self._conditioning, reference_mel=self._reference_mel)
        wav = wav.detach().float().reshape(-1).cpu().numpy()
        per_code = len(wav) // codes.shape[1]
        new = wav[(self._sent - start) * per_code :]
        if not np.all(np.isfinite(new)):
            raise RuntimeError("speech synthesis produced invalid samples")
        self._emit(AudioChunk(samples=new, sample_rate=self._rate, sequence=self.sequence))
        self.sequence += 1
        self.samples += len(new)
        self._sent = upto
