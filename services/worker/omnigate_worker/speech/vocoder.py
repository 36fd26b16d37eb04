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
  DiT's forward and the BigVGAN are transformers' own; the ODE solve repeats ``RungeKutta4ODESolver``'s
  arithmetic in a form a CUDA graph can capture (``dit_mel``, ``DitGraphs``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from opentelemetry.context import Context

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
    trace_context: Context | None = None  # the request's trace: each call is a worker.vocode span in it
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.key = (int(self.codes.shape[1]), tuple(self.reference_mel.shape))


def ode_times(
    num_steps: int,
    sway_coefficient: float | None,
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The DiT's ODE time points, as ``Qwen2_5OmniToken2WavDiTModel.sample`` computes them."""
    times = torch.linspace(0, 1, num_steps, device=device, dtype=dtype)
    if sway_coefficient is not None:
        times += sway_coefficient * (torch.cos(torch.pi / 2 * times) - 1 + times)
    return times


def dit_mel(
    token2wav: Any,
    codes: torch.Tensor,
    speaker: torch.Tensor,
    reference_mel: torch.Tensor,
    noise: torch.Tensor,
    times: torch.Tensor,
    guidance_scale: float = 0.5,
) -> torch.Tensor:
    """The DiT's ``sample`` (transformers 5.23) from the noise given: (B, window) codes to (B, mel, frames).

    ``speaker`` is the conditioning vector repeated per frame, (B, frames, C). The ODE is solved with the
    arithmetic of transformers' ``RungeKutta4ODESolver.integrate`` for increasing time points (where its
    interpolation returns each step's end value), without its Python comparisons of device scalars, which
    synchronize with the GPU every step and so cannot be captured in a CUDA graph (equality with the solver
    is tested)."""
    dit = token2wav.code2wav_dit_model

    def ode_function(time_step: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
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

    value = noise
    one_third, two_thirds = 1 / 3, 2 / 3
    for i in range(len(times) - 1):
        start, end = times[i], times[i + 1]
        step = end - start
        k1 = ode_function(start, value)
        k2 = ode_function(start + step * one_third, value + step * k1 * one_third)
        k3 = ode_function(start + step * two_thirds, value + step * (k2 - k1 * one_third))
        k4 = ode_function(end, value + step * (k1 - k2 + k3))
        value = value + (k1 + 3 * (k2 + k3) + k4) * step / 8
    return value.permute(0, 2, 1)


def check_window(token2wav: Any, codes: torch.Tensor) -> None:
    dit = token2wav.code2wav_dit_model
    frames = codes.shape[1] * dit.repeats
    if frames > dit.config.max_position_embeddings:
        raise ValueError(f"{frames} mel frames exceed the DiT's {dit.config.max_position_embeddings}")


def synthesize(
    token2wav: Any,
    codes: torch.Tensor,
    conditioning: torch.Tensor,
    reference_mel: torch.Tensor,
    noise: torch.Tensor,
    *,
    num_steps: int = 10,
    guidance_scale: float = 0.5,
    sway_coefficient: float = -1.0,
    mel_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """token2wav's forward (``Qwen2_5OmniToken2WavModel.forward`` and its DiT's ``sample``, transformers
    5.23) with the initial noise given: (B, window) codes to (B, samples) float32 waveforms. ``mel_fn``
    replaces the eager DiT solve (the vocoder's CUDA graphs)."""
    check_window(token2wav, codes)
    if mel_fn is not None:
        mel = mel_fn(codes, conditioning, reference_mel, noise)
    else:
        frames = codes.shape[1] * token2wav.code2wav_dit_model.repeats
        speaker = conditioning.unsqueeze(1).repeat(1, frames, 1)
        times = ode_times(num_steps, sway_coefficient, codes.device, speaker.dtype)
        mel = dit_mel(token2wav, codes, speaker, reference_mel, noise, times, guidance_scale)
    waveform = token2wav.code2wav_bigvgan_model(mel)  # squeezed, on the CPU
    return waveform.reshape(codes.shape[0], -1).float()


class DitGraphs:
    """The DiT's whole ODE solve (``num_steps`` Runge-Kutta steps, four guided forwards each) captured as
    one CUDA graph per (batch bucket, window codes, reference frames) and replayed: a vocoder call is then
    one replay instead of ~36 eager forwards of many small kernels, whose launches are most of its ~0.85 s
    on an H200 (../shared/notes/gpu.md). Rows past the batch in a bucket are padding (rows are independent).
    Each capture is checked against the eager solve on its first inputs; a shape whose capture fails or
    differs runs eagerly (logged). At most ``max_graphs`` shapes; one shared memory pool."""

    def __init__(
        self, token2wav: Any, device: torch.device, num_steps: int, max_batch: int, max_graphs: int = 32
    ) -> None:
        self._token2wav = token2wav
        self._device = device
        self._times = ode_times(num_steps, -1.0, device)
        self._max_batch = max_batch
        self._max_graphs = max_graphs
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, tuple] = {}
        self.failed: set[tuple] = set()

    def _eager(
        self,
        codes: torch.Tensor,
        conditioning: torch.Tensor,
        reference_mel: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        frames = noise.shape[1]
        speaker = conditioning.unsqueeze(1).repeat(1, frames, 1)
        return dit_mel(self._token2wav, codes, speaker, reference_mel, noise, self._times)

    def __call__(
        self,
        codes: torch.Tensor,
        conditioning: torch.Tensor,
        reference_mel: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        rows = int(codes.shape[0])
        width = min(1 << max(0, rows - 1).bit_length(), max(self._max_batch, rows))
        key = (width, int(codes.shape[1]), tuple(reference_mel.shape[1:]))
        entry = self._graphs.get(key)
        if entry is None:
            if key in self.failed or len(self._graphs) >= self._max_graphs:
                return self._eager(codes, conditioning, reference_mel, noise)
            entry = self._capture(key, codes, conditioning, reference_mel, noise)
            if entry is None:
                return self._eager(codes, conditioning, reference_mel, noise)
        graph, inputs, output = entry
        for static, value in zip(inputs, (codes, conditioning, reference_mel, noise), strict=True):
            static[:rows].copy_(value)
        graph.replay()
        return output[:rows].clone()

    def _capture(self, key, codes, conditioning, reference_mel, noise):
        width, window, _ = key
        rows = int(codes.shape[0])
        statics = [
            torch.zeros((width, *value.shape[1:]), dtype=value.dtype, device=self._device)
            for value in (codes, conditioning, reference_mel, noise)
        ]
        for static, value in zip(statics, (codes, conditioning, reference_mel, noise), strict=True):
            static[:rows].copy_(value)
        try:
            stream = torch.cuda.Stream(device=self._device)
            stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(stream):
                self._eager(*statics)  # warms kernels and workspaces outside the capture
            torch.cuda.current_stream(self._device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self._eager(*statics)
            graph.replay()
            want = self._eager(codes, conditioning, reference_mel, noise)
            if not torch.allclose(output[:rows], want, rtol=1e-3, atol=1e-3):
                raise RuntimeError(
                    f"the replay differs from the eager solve by {(output[:rows] - want).abs().max():.3g}"
                )
        except Exception:  # noqa: BLE001 - this shape runs eagerly instead
            log.warning(
                "vocoder CUDA graph for batch %d, window %d failed; eager for it",
                width,
                window,
                exc_info=True,
            )
            self.failed.add(key)
            return None
        self._graphs[key] = (graph, statics, output)
        log.info(
            "captured the vocoder's ODE solve for batch %d, window %d codes (%d graphs)",
            width,
            window,
            len(self._graphs),
        )
        return self._graphs[key]


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

    def __init__(
        self,
        token2wav: Any,
        device: torch.device,
        *,
        num_steps: int,
        max_batch: int,
        cuda_graphs: bool = True,
    ) -> None:
        self._token2wav = token2wav
        self._graphs = (
            DitGraphs(token2wav, device, num_steps, max_batch)
            if cuda_graphs and device.type == "cuda"
            else None
        )
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
            with contextlib.suppress(Exception):  # e.g. the request's event loop is already closed
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
            try:
                if batch and not batch[0].alive():
                    for job in batch:  # dropped: the request learns it from its own state
                        job.on_done(None, None)
                elif batch:
                    self._run(batch)
            except Exception as exc:  # noqa: BLE001 - the thread must live on: every later request needs it
                log.exception("the vocoder loop failed on %d chunks", len(batch))
                for job in batch:
                    with contextlib.suppress(Exception):
                        job.on_done(None, exc)  # a request ends once: later calls are no-ops

    def _run(self, batch: list[VocodeJob]) -> None:
        started = time.monotonic()
        try:
            waves = self._synthesize(batch)
        except Exception as exc:  # noqa: BLE001 - a shared call failed: each job gets its own try
            if len(batch) == 1:
                log.warning("vocoding a speech chunk failed", exc_info=True)
                self._trace(batch[0], started, 1, exc)
                _answer(batch[0], None, exc)
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
                _answer(job, None, RuntimeError("speech synthesis produced invalid samples"))
            else:
                _answer(job, samples, None)

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
        stream: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
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
                mel_fn=self._graphs,
            )
        return [wave.numpy() for wave in waves]


def _answer(job: VocodeJob, samples: np.ndarray | None, error: BaseException | None) -> None:
    """Hands a job its result; one request's failing callback never reaches the others in the call."""
    try:
        job.on_done(samples, error)
    except Exception:  # noqa: BLE001 - e.g. the request's event loop is gone
        log.warning("a speech request's chunk callback failed", exc_info=True)


def chunk_plan(first: int, sequence: int) -> int:
    """Codes in chunk ``sequence``: the first is small (early audio), each next one doubles up to 8x, since
    every vocoder call has a fixed cost (the DiT's ODE steps) that small chunks would pay over and over.
    Sizes come from a small set (first x 1, 2, 4, 8), so concurrent requests' chunks share shapes."""
    return first * min(8, 2**sequence)
