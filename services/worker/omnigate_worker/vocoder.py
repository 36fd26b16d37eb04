"""The vocoder stage: codec codes to waveform on a thread of its own, batched across requests.

Qwen2.5-Omni's token2wav is a DiT (codes to mel, an ODE solved in ``num_steps`` Runge-Kutta steps, each
two forwards with classifier-free guidance) and BigVGAN (mel to waveform). Its cost is per call, not per
code (~0.85 s for 25 to 100 codes on an H200, fp32 eager: ../shared/notes/gpu.md), so:

- **Its own thread** (and on CUDA its own stream): the engine thread keeps decoding the thinker and the
  talker while chunks are vocoded.
- **Batched across requests**: pending chunks of the same window length (codes) and speaker reference
  shape run as one call, one request's earliest chunk at a time so each request's audio stays in order.
- **Noise per request**: the DiT starts from Gaussian noise. ``Qwen2_5OmniToken2WavDiTModel.sample`` draws
  it from the global generator for the whole batch, so a batched call would change every request's audio.
  Here each request draws its noise from its own generator, once per mel frame position, and every chunk
  uses the slice at its own positions: a chunk's audio depends only on its request, and the chunks joined
  track the waveform of one unstreamed synthesis with the same noise (tests/worker/test_speech.py). The
  ODE function and the Runge-Kutta solver are transformers' own (``RungeKutta4ODESolver``, the DiT's
  forward); only the noise is ours.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

from omnigate import tracing

log = logging.getLogger(__name__)

MAX_VOCODER_BATCH = 16


@dataclass(eq=False)
class VocodeJob:
    """One chunk of one request: ``codes`` (window, context and look-ahead included) to audio; the samples
    of codes [keep_from, keep_to) of the window are kept."""

    codes: torch.Tensor  # (1, window) long, on the vocoder's device
    noise: torch.Tensor  # (1, window * repeats, mel) float32
    conditioning: torch.Tensor  # (1, C)
    reference_mel: torch.Tensor  # (1, T_ref, mel)
    keep_from: int
    keep_to: int
    on_done: Callable[[np.ndarray | None, BaseException | None], None]
    alive: Callable[[], bool]
    owner: object  # the request; its chunks are vocoded in order
    sequence: int = 0  # the chunk's place in its request's audio
    trace_context: object = None  # the request's trace: each call is a worker.vocode span in it
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.key = (int(self.codes.shape[1]), tuple(self.reference_mel.shape))


def synthesize(
    token2wav,
    codes: torch.Tensor,
    conditioning: torch.Tensor,
    reference_mel: torch.Tensor,
    noise: torch.Tensor,
    *,
    num_steps: int = 10,
    guidance_scale: float = 0.5,
    sway_coefficient: float = -1.0,
) -> torch.Tensor:
    """token2wav's forward (``Qwen2_5OmniToken2WavModel.forward`` and its DiT's ``sample``, transformers
    5.23) with the initial noise given: (B, window) codes to (B, samples) float32 waveforms."""
    dit = token2wav.code2wav_dit_model
    frames = codes.shape[1] * dit.repeats
    if frames > dit.config.max_position_embeddings:
        raise ValueError(f"{frames} mel frames exceed the DiT's {dit.config.max_position_embeddings}")
    speaker = conditioning.unsqueeze(1).repeat(1, frames, 1)

    def ode_function(time_step, hidden_states):
        if guidance_scale < 1e-5:
            return dit(
                hidden_states=hidden_states,
                speaker_embedding=speaker,
                condition_vector=reference_mel,
                quantized_code=codes,
                time_step=time_step,
                drop_audio_conditioning=False,
                drop_code=False,
                apply_cfg=False,
            )
        output = dit(
            hidden_states=hidden_states,
            quantized_code=codes,
            speaker_embedding=speaker,
            condition_vector=reference_mel,
            time_step=time_step,
            apply_cfg=True,
        )
        guided, null = torch.chunk(output, 2, dim=0)
        return guided + (guided - null) * guidance_scale

    times = torch.linspace(0, 1, num_steps, device=codes.device, dtype=speaker.dtype)
    if sway_coefficient is not None:
        times += sway_coefficient * (torch.cos(torch.pi / 2 * times) - 1 + times)
    trajectory = RungeKutta4ODESolver(function=ode_function, initial_value=noise).integrate(times)
    mel = trajectory[-1].permute(0, 2, 1)
    waveform = token2wav.code2wav_bigvgan_model(mel)  # squeezed, on the CPU
    return waveform.reshape(codes.shape[0], -1).float()


class NoiseSource:
    """One request's DiT noise: a mel frame's noise is the same whichever chunk asks for it. Drawn in blocks
    of ``BLOCK`` frames, each from a generator seeded by (request seed, block), so it does not depend on how
    the request's codes were cut into chunks."""

    BLOCK = 128

    def __init__(self, mel_dim: int, repeats: int, device: torch.device, seed: int | None) -> None:
        self._mel, self._repeats, self._device = mel_dim, repeats, device
        self._seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
        self._blocks: list[torch.Tensor] = []

    def _block(self, index: int) -> torch.Tensor:
        while len(self._blocks) <= index:
            generator = torch.Generator(device=self._device)
            generator.manual_seed((self._seed * 1_000_003 + len(self._blocks)) % 2**63)
            self._blocks.append(
                torch.randn((self.BLOCK, self._mel), generator=generator, device=self._device)
            )
        return self._blocks[index]

    def codes(self, start: int, end: int) -> torch.Tensor:
        """Noise of codes [start, end): (1, (end - start) * repeats, mel)."""
        first, last = start * self._repeats, end * self._repeats
        blocks = [self._block(b) for b in range(first // self.BLOCK, (last - 1) // self.BLOCK + 1)]
        offset = (first // self.BLOCK) * self.BLOCK
        return torch.cat(blocks)[first - offset : last - offset].unsqueeze(0)


class Vocoder:
    """The vocoder thread: takes ``VocodeJob``s, runs them in batches, calls each job's ``on_done``."""

    def __init__(self, token2wav, device: torch.device, *, num_steps: int, max_batch: int) -> None:
        self._token2wav = token2wav
        self._device = device
        self._num_steps = num_steps
        self._max_batch = max(1, max_batch)
        self._pending: collections.deque[VocodeJob] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.calls = 0  # batched token2wav calls made (tests, logs)
        self.batched_jobs = 0  # jobs that shared a call with another
        self._thread = threading.Thread(target=self._loop, name="vocoder", daemon=True)
        self._thread.start()

    @property
    def mel_dim(self) -> int:
        return int(self._token2wav.code2wav_dit_model.mel_dim)

    @property
    def repeats(self) -> int:
        return int(self._token2wav.code2wav_dit_model.repeats)

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, job: VocodeJob) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the vocoder is closed")
            self._pending.append(job)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            jobs = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in jobs:
            job.on_done(None, RuntimeError("the worker shut down before this speech was synthesized"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _take(self) -> list[VocodeJob] | None:
        """Waits for work: the oldest job, with other requests' first pending jobs of the same shape."""
        with self._cond:
            while not self._closed and not self._pending:
                self._cond.wait()
            if self._closed:
                return None
            alive = [(job, job.alive()) for job in self._pending]
            kept = collections.deque(job for job, ok in alive if ok)
            dropped = [job for job, ok in alive if not ok]
            self._pending = kept
            if dropped or not kept:
                return dropped  # their requests end (cancelled, expired or failed) outside the lock
            head = kept[0]
            batch, owners = [head], {id(head.owner)}
            for job in list(kept)[1:]:
                if len(batch) >= self._max_batch:
                    break
                if id(job.owner) in owners:
                    continue  # one chunk per request per call keeps each request's chunks in order
                owners.add(id(job.owner))
                if job.key == head.key:
                    batch.append(job)
            for job in batch:
                self._pending.remove(job)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch and not batch[0].alive():
                for job in batch:  # dropped: the request learns it from its own state
                    job.on_done(None, None)
            elif batch:
                self._run(batch)

    def _run(self, batch: list[VocodeJob]) -> None:
        started = time.monotonic()
        try:
            waves = self._synthesize(batch)
        except Exception as exc:  # noqa: BLE001 - a shared call failed: each job gets its own try
            if len(batch) == 1:
                log.warning("vocoding a speech chunk failed", exc_info=True)
                batch[0].on_done(None, exc)
                return
            log.warning("a batched vocoder call failed (%r); its %d chunks run one by one", exc, len(batch))
            for job in batch:
                self._run([job])
            return
        for job, wave in zip(batch, waves, strict=True):
            self._trace(job, started, len(batch))
            per_code = len(wave) // int(job.codes.shape[1])
            samples = wave[job.keep_from * per_code : job.keep_to * per_code]
            if not np.all(np.isfinite(samples)):
                job.on_done(None, RuntimeError("speech synthesis produced invalid samples"))
            else:
                job.on_done(samples, None)

    @staticmethod
    def _trace(job: VocodeJob, started: float, batch: int, error: BaseException | None = None) -> None:
        if job.trace_context is None:
            return
        attributes = {
            "omnigate.codes": job.keep_to - job.keep_from,
            "omnigate.sequence": job.sequence,
            "omnigate.batch": batch,
        }
        tracing.record_span(
            tracing.WORKER, "worker.vocode", job.trace_context, started, time.monotonic(), attributes, error
        )

    @torch.inference_mode()
    def _synthesize(self, batch: list[VocodeJob]) -> list[np.ndarray]:
        self.calls += 1
        if len(batch) > 1:
            self.batched_jobs += len(batch)
        stream = contextlib.nullcontext()
        if self._stream is not None:
            # The chunks' codes and noise were written on the engine thread's stream.
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
            stream = torch.cuda.stream(self._stream)
        with stream:
            waves = synthesize(
                self._token2wav,
                torch.cat([job.codes for job in batch]),
                torch.cat([job.conditioning for job in batch]),
                torch.cat([job.reference_mel for job in batch]),
                torch.cat([job.noise for job in batch]),
                num_steps=self._num_steps,
            )
        return [wave.numpy() for wave in waves]


def chunk_plan(first: int, sequence: int) -> int:
    """Codes in chunk ``sequence``: the first is small (early audio), each next one doubles up to 8x, since
    every vocoder call has a fixed cost (the DiT's ODE steps) that small chunks would pay over and over.
    Sizes come from a small set (first x 1, 2, 4, 8), so concurrent requests' chunks share shapes."""
    return first * min(8, 2**sequence)
