"""Speech as three pipelined stages: the thinker (text), the talker (codec codes), the vocoder (waveform).

A speech request's thinker is a row of the text batch like any text request (slots.py); its row carries a
``ThinkerTap`` that keeps what the talker needs from it: the prompt's hidden states and embeddings, and per
reply token the last hidden state plus the token's embedding. As soon as the first reply vector exists, the
request's talker is prefilled and joins the talker batch (talker.py), which steps right after the text batch
on the engine thread, so the talker speaks while the thinker is still writing. Codes go to the request's
``SpeechRequest``, which cuts them into chunks (a small first chunk for early audio, then larger ones; each
with left context and look-ahead codes so the joins match one unstreamed synthesis) and hands them to the
vocoder thread (vocoder.py), which batches chunks across requests. Audio chunks are emitted as they are
vocoded; the request's summary (tokens, audio seconds) comes after its last chunk.

``SpeechBatch`` is what the scheduler sees: the text batch and the talker batch as one ``Batch``. Text and
speech requests decode together; neither waits for the other to drain.

Cancellation and deadlines stop all three stages: the thinker row and the talker row leave their batches at
the next step (their KV slots are free again), and the vocoder drops the request's pending chunks.

Models without the slot runner (or ``stream_speech=false``) keep the one-request path through
``generate`` and its ``talker_streamer`` (``SpeechStreamer`` below).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from opentelemetry.context import Context
from transformers.generation.streamers import BaseStreamer

from omnigate import tracing
from omnigate.conversation import AudioChunk, Event, Summary
from omnigate.errors import DeadlineExceeded, LimitExceeded
from omnigate_worker.engine.base import Batch, EventSink, Prepared
from omnigate_worker.engine.batching import Done, Row
from omnigate_worker.settings import WorkerSettings
from omnigate_worker.speech.talker import TALKER_STOP_CODES, TalkerBatch
from omnigate_worker.speech.vocoder import NoiseSource, VocodeJob, Vocoder, chunk_plan

log = logging.getLogger(__name__)


class ThinkerTap:
    """What a speech request's thinker row hands the talker (filled on the engine thread)."""

    def __init__(
        self, input_ids: torch.Tensor, *, has_audio: bool, has_images: bool, has_videos: bool
    ) -> None:
        self.input_ids = input_ids  # (1, L)
        self.has_audio, self.has_images, self.has_videos = has_audio, has_images, has_videos
        self.prompt_embeds: torch.Tensor | None = None  # (1, L, H), what the decoder was given
        self._hidden: list[torch.Tensor] = []  # (1, l, H) pieces of the prompt's last hidden states
        self.reply: list[torch.Tensor] = []  # per fed reply token: last hidden state + its embedding, (H,)
        self.first_token: int | None = None
        self.generated: int | None = None  # reply tokens in all, once the thinker has finished
        self.on_reply = lambda: None  # called after each new reply vector

    @property
    def prompt_hidden(self) -> torch.Tensor:
        if len(self._hidden) > 1:
            self._hidden = [torch.cat(self._hidden, dim=1)]
        return self._hidden[0]

    def drop_prompt(self) -> None:
        """The talker's prompt is built: its inputs are not needed any more (frees L x hidden x 2)."""
        self.prompt_embeds = None
        self._hidden = []

    def add_prompt_hidden(self, hidden: torch.Tensor) -> None:
        self._hidden.append(hidden.detach().clone())

    def fed(self, vector: torch.Tensor, token: int) -> None:
        if self.first_token is None:
            self.first_token = token
        self.reply.append(vector)
        self.on_reply()

    def finish(self, generated: int) -> None:
        self.generated = generated


class TalkerFeed:
    """The talker row's input per step: ``generate``'s ``thinker_reply_part``, read as the thinker writes it.

    Step k (k >= 1, after the prompt) takes reply[k] while the reply lasts, then the text end embedding,
    then the pad embedding for ever; reply[k] exists once the thinker has fed reply token k."""

    def __init__(
        self, tap: ThinkerTap, end: torch.Tensor, pad: torch.Tensor, on_code: Callable[[int], None]
    ) -> None:
        self._tap = tap
        self._end, self._pad = end, pad
        self.on_code = on_code
        self._step = 1
        self.row: Row | None = None

    def bind(self, row: Row) -> None:
        self.row = row

    def next_vector(self) -> torch.Tensor | None:
        tap, j = self._tap, self._step - 1
        if tap.generated is not None:
            n = tap.generated
            if j <= n - 3:
                return tap.reply[j + 1]
            return self._end if j == n - 2 else self._pad
        return tap.reply[j + 1] if j + 1 < len(tap.reply) else None

    def consumed(self) -> None:
        self._step += 1

    def history(self, device: torch.device) -> torch.Tensor:
        assert self.row is not None  # bound (start_talker) before the row's first step
        return torch.tensor([self.row.tokens], dtype=torch.long, device=device)


class _Either:
    """Set when either event is: the talker row stops when the client cancels or the request failed."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self._a, self._b = a, b

    def is_set(self) -> bool:
        return self._a.is_set() or self._b.is_set()


class SpeechRequest:
    """One speech request across the three stages; ends it once (summary after the last chunk, or error)."""

    def __init__(
        self,
        pipeline: SpeechPipeline,
        tap: ThinkerTap,
        *,
        emit: EventSink,
        done: Done,
        cancelled: threading.Event,
        deadline: float | None,
        speaker: str,
        seed: int | None,
        started: float,
    ) -> None:
        self.pipeline = pipeline
        self.tap = tap
        self.speaker = speaker
        self.seed = seed
        self.cancelled = cancelled
        self.deadline = deadline
        self.started = started
        self.stopped = threading.Event()  # the request failed or ended: its stages stop
        self.talker_cancelled = _Either(cancelled, self.stopped)
        self._emit = emit
        self._done = done
        self._lock = threading.Lock()
        self._summary: Summary | None = None
        self._ended = False
        self.talker_started = False
        self.codes: list[int] = []
        self._codes_done = False
        self._chunked = 0  # codes handed to the vocoder
        self._sequence = 0  # chunks submitted
        self._emitted = 0  # chunks emitted
        self._samples = 0
        self.prepared: Prepared | None = None  # the engine's request (the talker's rope inputs come from it)
        self.trace_context: Context | None = (
            None  # the request's trace (worker.talker and worker.vocode spans go there)
        )
        self._talker_started_at: float | None = None
        self._noise = NoiseSource(pipeline.vocoder.mel_dim, pipeline.vocoder.repeats, pipeline.device, seed)
        conditioning, reference = pipeline.speaker_tensors(speaker)
        self._conditioning, self._reference = conditioning, reference
        tap.on_reply = self._on_reply

    # -- thinker (engine thread) --
    def thinker_emit(self, event: Event) -> None:
        if isinstance(event, Summary):
            self._summary = event  # sent after the last audio chunk, with the audio's length
        else:
            self._emit(event)

    def thinker_done(self, error: BaseException | None) -> None:
        if error is not None or self.cancelled.is_set():
            self._end(error)
            return
        generated = self._summary.output_tokens if self._summary is not None else len(self.tap.reply) + 1
        self.tap.finish(generated)
        if generated < 2:
            # generate() has nothing to speak when the thinker's first token ends the reply.
            log.info("the reply is empty, so there is no speech")
            with self._lock:
                self._codes_done = True
            self._maybe_complete()
        elif not self.talker_started:
            self.pipeline.want_talker(self)

    def _on_reply(self) -> None:
        if len(self.tap.reply) == 1 and not self.talker_started:
            self.pipeline.want_talker(self)

    # -- talker (engine thread) --
    def on_code(self, code: int) -> None:
        if code in TALKER_STOP_CODES or self.stopped.is_set():
            return
        self.codes.append(code)
        self._submit_ready(final=False)

    def talker_began(self) -> None:
        self._talker_started_at = time.monotonic()

    def talker_done(self, error: BaseException | None) -> None:
        if self._talker_started_at is not None and self.trace_context is not None:
            attributes = {"omnigate.codes": len(self.codes), "omnigate.cancelled": self.cancelled.is_set()}
            tracing.record_span(
                tracing.WORKER,
                "worker.talker",
                self.trace_context,
                self._talker_started_at,
                time.monotonic(),
                attributes,
                error,
            )
        if error is not None or self.cancelled.is_set():
            self._end(error)
            return
        with self._lock:
            self._codes_done = True
        self._submit_ready(final=True)
        self._maybe_complete()

    # -- vocoder --
    def _submit_ready(self, *, final: bool) -> None:
        settings = self.pipeline.settings
        while True:
            start = self._chunked
            end = start + chunk_plan(settings.speech_chunk_codes, self._sequence)
            have = len(self.codes)
            if not final and have < end + settings.speech_lookahead_codes:
                return
            end = min(end, have)
            if end <= start:
                return
            window_from = max(0, start - settings.speech_context_codes)
            window_to = min(have, end + settings.speech_lookahead_codes)
            self._chunked = end
            self._sequence += 1
            self.pipeline.vocode(self, window_from, window_to, start - window_from, end - window_from)

    def job(
        self, window_from: int, window_to: int, keep_from: int, keep_to: int, device: torch.device
    ) -> VocodeJob:
        return VocodeJob(
            codes=torch.tensor([self.codes[window_from:window_to]], dtype=torch.long, device=device),
            noise=self._noise.codes(window_from, window_to),
            conditioning=self._conditioning,
            reference_mel=self._reference,
            keep_from=keep_from,
            keep_to=keep_to,
            on_done=self._vocoded,
            alive=self._alive,
            owner=self,
            sequence=self._sequence - 1,
            trace_context=self.trace_context,
        )

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _alive(self) -> bool:
        expired = self.deadline is not None and time.monotonic() > self.deadline
        return not (self.stopped.is_set() or self.cancelled.is_set() or expired)

    def _vocoded(self, samples: np.ndarray | None, error: BaseException | None) -> None:
        """A chunk's audio (on the vocoder thread); no samples and no error: the chunk was dropped."""
        if error is not None:
            if "out of memory" in str(error).lower():
                error = LimitExceeded(
                    "the worker ran out of memory synthesizing this request's speech; retry later",
                    retry_after_s=5.0,
                )
            self._end(error)
            return
        if self.cancelled.is_set():
            self._end(None)
            return
        if self.stopped.is_set():
            return
        if self.deadline is not None and time.monotonic() > self.deadline:
            self._end(DeadlineExceeded("the request's deadline passed while its speech was synthesized"))
            return
        if samples is None:  # pragma: no cover - only dropped chunks come without samples
            return
        rate = self.pipeline.sample_rate
        with self._lock:
            sequence = self._emitted
            self._emitted += 1
            self._samples += len(samples)
        self._emit(AudioChunk(samples=samples, sample_rate=rate, sequence=sequence))
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        with self._lock:
            if self._ended or not self._codes_done or self._emitted < self._sequence:
                return
            self._ended = True
        self.stopped.set()
        self.pipeline.finished(self)
        summary = self._summary
        now = time.monotonic()
        if summary is not None:
            summary.audio_seconds = self._samples / self.pipeline.sample_rate
            summary.timings.generate_s = now - self.started
            summary.timings.total_s = now - self.started
            self._emit(summary)
        self._done(None)

    def fail(self, error: BaseException | None) -> None:
        self._end(error)

    def _end(self, error: BaseException | None) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self.stopped.set()
        self.pipeline.finished(self)
        self._done(error)


class SpeechPipeline:
    """The talker batch, the vocoder and the speech requests between them (one per engine)."""

    def __init__(
        self,
        model: Any,
        talker_batch: TalkerBatch,
        vocoder: Vocoder,
        settings: WorkerSettings,
        sample_rate: int,
        start_talker: Callable[[SpeechRequest], None],
    ) -> None:
        self.model = model
        self.talker = talker_batch
        self.vocoder = vocoder
        self.settings = settings
        self.sample_rate = sample_rate
        self.device = next(model.token2wav.parameters()).device
        self._start_talker = start_talker  # (SpeechRequest) -> None: prefills the talker, joins the batch
        self._waiting: list[SpeechRequest] = []  # talkers to start before the next talker step
        self.active: set[SpeechRequest] = set()
        self._lock = threading.Lock()
        self._speakers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def speaker_tensors(self, speaker: str) -> tuple[torch.Tensor, torch.Tensor]:
        if speaker not in self._speakers:
            params = self.model.speaker_map[speaker]
            conditioning = params["cond"].to(self.device).float().reshape(1, -1)
            reference = params["ref_mel"].to(self.device).float()
            self._speakers[speaker] = (conditioning, reference.reshape(1, *reference.shape[-2:]))
        return self._speakers[speaker]

    def begin(self, request: SpeechRequest) -> None:
        with self._lock:
            self.active.add(request)

    def finished(self, request: SpeechRequest) -> None:
        with self._lock:
            self.active.discard(request)

    def want_talker(self, request: SpeechRequest) -> None:
        if not request.talker_started and request not in self._waiting:
            self._waiting.append(request)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start_waiting(self) -> None:
        """Starts the talkers whose first reply vector exists, while talker slots are free (engine thread)."""
        for request in [r for r in self._waiting if r.cancelled.is_set() or r.expired()]:
            self._waiting.remove(request)  # ended here: its thinker may be done, and no talker will run
            request.fail(
                DeadlineExceeded("the request's deadline passed before it spoke")
                if request.expired()
                else None
            )
        while self._waiting and len(self.talker) < self.talker._pool.slots:
            request = self._waiting.pop(0)
            if request.stopped.is_set():
                continue
            request.talker_started = True
            try:
                with (
                    tracing.activate(context=request.trace_context),
                    tracing.tracer(tracing.WORKER).start_as_current_span("worker.talker_prefill"),
                ):
                    self._start_talker(request)
            except Exception as exc:  # noqa: BLE001 - only this request fails
                log.info("starting a talker failed", exc_info=True)
                if "out of memory" in str(exc).lower():
                    exc = LimitExceeded(
                        "the worker ran out of memory for this request's speech; retry later",
                        retry_after_s=5.0,
                    )
                request.fail(exc)

    def vocode(
        self, request: SpeechRequest, window_from: int, window_to: int, keep_from: int, keep_to: int
    ) -> None:
        self.vocoder.submit(request.job(window_from, window_to, keep_from, keep_to, self.device))

    def fail_all(self, error: BaseException) -> None:
        for request in list(self._waiting):
            request.fail(error)
        self._waiting.clear()


class SpeechBatch(Batch):
    """The text batch and the talker batch stepped together (what the scheduler drives).

    A failed step fails only the rows it ran: the scheduler fails the text batch's rows when the text step
    raised, and a failed talker step ends the talkers' requests here, never the text rows."""

    def __init__(self, text: Batch, pipeline: SpeechPipeline) -> None:
        self.text = text
        self.pipeline = pipeline
        self._text_failed = False

    def __len__(self) -> int:
        return len(self.text) + len(self.pipeline.talker) + self.pipeline.waiting

    @property
    def length(self) -> int:
        return self.text.length

    def admits(self, prompt_tokens: int, admitted: list[int]) -> bool:
        return self.text.admits(prompt_tokens, admitted)

    def step(self) -> None:
        failure = None
        if len(self.text):
            try:
                self.text.step()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the talkers stepped
                failure = exc
        self.pipeline.start_waiting()
        talker = self.pipeline.talker
        if len(talker):
            try:
                talker.step()
            except Exception as exc:  # noqa: BLE001 - the talkers' requests fail, nothing else
                log.exception("a talker step failed")
                talker.fail_all(exc)
        if failure is not None:
            self._text_failed = True
            raise failure

    def state_tensors(self) -> list[torch.Tensor]:
        return [*self.text.state_tensors(), *self.pipeline.talker.state_tensors()]

    def fail_all(self, error: BaseException) -> None:
        self.text.fail_all(error)
        if self._text_failed:  # the scheduler failing a text step: the talkers did not run in it
            self._text_failed = False
            return
        self.pipeline.talker.fail_all(error)
        self.pipeline.fail_all(error)


class SpeechStreamer(BaseStreamer):
    """The one-request path's streaming (``generate`` with ``talker_streamer``): receives the talker's codes
    as ``generate`` produces them and vocodes growing chunks with left context, on the engine thread.
    transformers 5.23 still synthesizes the whole waveform at the end of ``generate``, so this path pays
    for synthesis twice; the pipeline above does not."""

    def __init__(
        self,
        token2wav: Any,
        speaker_params: dict[str, torch.Tensor],
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

    def put(self, value: torch.Tensor) -> None:
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
        return chunk_plan(self._chunk, self.sequence)

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
