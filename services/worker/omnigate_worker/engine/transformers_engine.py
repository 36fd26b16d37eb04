"""The real engine: transformers' loading and generation code, with streaming and batching.

Generic over model families: what a family adds (its text module, generate arguments, speakers, request
checks, speech or image output) comes from its module in ``families/``. This file holds the request path:
preparing inputs, the batched decode loop's rows (``start_row``), the one-request path through ``generate``
(``run``), and the speech pipeline's wiring where a family wants it (``speech.py``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jinja2
import numpy as np
import torch
from prometheus_client import CollectorRegistry
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache

from omnigate.conversation import (
    AudioChunk,
    ContentPart,
    FinishReason,
    GenerationMode,
    GenerationParams,
    GenerationRequest,
    Message,
    Modality,
    ModelInfo,
    Summary,
    Timings,
)
from omnigate.errors import InvalidInput, LimitExceeded, quote
from omnigate_worker.engine import inputs as model_inputs
from omnigate_worker.engine import slots
from omnigate_worker.engine.base import Batch, Engine, EventSink, Prepared
from omnigate_worker.engine.batching import DecodeBatch, Done, Row, cache_is_batchable
from omnigate_worker.engine.decoders import DecoderFamily, decoder_for
from omnigate_worker.engine.loading import LoadedModel
from omnigate_worker.engine.sampling import generate_kwargs, generation_config
from omnigate_worker.engine.streaming import TextOutput, TokenStreamer
from omnigate_worker.families import family_for
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.settings import WorkerSettings
from omnigate_worker.speech.pipeline import (
    SpeechBatch,
    SpeechPipeline,
    SpeechRequest,
    TalkerFeed,
    ThinkerTap,
)
from omnigate_worker.speech.talker import TalkerBatch, TalkerFamily, start_talker
from omnigate_worker.speech.vocoder import Vocoder

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}


class _NotBatchable(Exception):
    """This model's cache cannot be merged across requests; it runs one request at a time."""


class _CancelCriteria(StoppingCriteria):
    """Stops generation at the next step when the request is cancelled or a stop string was seen."""

    def __init__(self, cancelled: threading.Event, stop: threading.Event) -> None:
        self._cancelled = cancelled
        self._stop = stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        done = self._cancelled.is_set() or self._stop.is_set()
        # A bool tensor, which torch's stubs type as a plain Tensor.
        return torch.full(  # type: ignore[return-value]
            (input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device
        )


class TransformersEngine(Engine):
    def __init__(
        self,
        loaded: LoadedModel,
        settings: WorkerSettings,
        model_id: str,
        *,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._model = loaded.model
        self._processor = loaded.processor
        self._device = loaded.device
        self._dtype = loaded.dtype
        self._settings = settings
        self._metrics = metrics or WorkerMetrics(CollectorRegistry())  # inter-token latency
        self._tokenizer = getattr(self._processor, "tokenizer", self._processor)
        self._family = family_for(self._model, self._processor, settings)
        # The module whose generate() produces text (Qwen-Omni: its thinker): what the decode loop batches.
        self._gen_model = self._family.text_model
        self._batchable = settings.max_batch_size > 1 and hasattr(self._gen_model, "_prefill")
        self._attn_implementation = loaded.attn_implementation
        self._decoder = decoder_for(self._gen_model)
        self._pool: slots.SlotPool | None = None
        self._talker_pool: slots.SlotPool | None = None
        self._speech: SpeechPipeline | None = None
        if self._batchable:
            self._talker_pool = self._talker_slots(settings)  # first: on CUDA the thinker's budget counts it
            self._pool = self._slot_pool(settings)
            if self._pool is None:
                self._talker_pool = None
        pad = getattr(self._gen_model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = getattr(self._tokenizer, "pad_token_id", None) or 0
        self._pad_token_id = int(pad[0] if isinstance(pad, list) else pad)
        vocab = self._tokenizer.get_vocab() if hasattr(self._tokenizer, "get_vocab") else {}
        self._max_token_chars = max((len(token) for token in vocab), default=64) or 64
        self._audio_padding = self._family.audio_padding() if settings.trim_audio_padding else None
        architecture = type(self._model).__name__
        inputs = [Modality(m) for m in _as_tuple(getattr(self._model, "input_modalities", ("text",)))]
        outputs = [Modality(m) for m in _as_tuple(getattr(self._model, "output_modalities", ("text",)))]
        outputs = self._family.output_modalities(outputs)
        feature_extractor = getattr(self._processor, "feature_extractor", None)
        self.info = ModelInfo(
            model_id=model_id,
            architecture=architecture,
            input_modalities=inputs,
            output_modalities=outputs,
            input_audio_sample_rate=int(getattr(feature_extractor, "sampling_rate", 0) or 0),
            output_audio_sample_rate=self._family.output_audio_rate if Modality.AUDIO in outputs else 0,
            speakers=self._family.speakers,
            device=f"{loaded.device} {str(loaded.dtype).removeprefix('torch.')}",
            max_image_pixels=model_inputs.max_pixels(getattr(self._processor, "image_processor", None)),
            max_video_frame_pixels=model_inputs.max_pixels(getattr(self._processor, "video_processor", None)),
        )
        if self._talker_pool is not None:
            self._speech = self._speech_pipeline(settings)
        self._describe_runner()

    # -- the decode runner ----------------------------------------------------------------------

    def _talker_slots(self, settings: WorkerSettings) -> slots.SlotPool | None:
        """KV-cache slots for Qwen2.5-Omni's talker, when speech runs as pipelined stages (speech.py)."""
        if not self._family.wants_speech_pipeline():
            return None
        if settings.decode_runner == "dynamic" or self._decoder.unsupported() is not None:
            return None
        family = TalkerFamily(self._model.talker)
        reason = family.unsupported()
        if reason is not None:
            log.info("speech runs one request at a time: the talker %s", reason)
            return None
        prompt = min(settings.max_prompt_tokens, settings.kv_slot_tokens or settings.max_prompt_tokens)
        plan = slots.SlotPlan(
            settings.speech_max_streams, prompt + 2 + settings.max_talker_tokens, family.geometry(self._dtype)
        )
        log.info("talker decoding over %s", plan.describe())
        return slots.SlotPool(plan, family, self._device, (3,))

    def _speech_pipeline(self, settings: WorkerSettings) -> SpeechPipeline:
        assert self._talker_pool is not None  # called once the talker's slots exist
        talker = self._model.talker
        family = TalkerFamily(talker)
        batch = TalkerBatch(
            family,
            self._talker_pool,
            settings,
            eager_attention=talker.config._attn_implementation == "eager",
        )
        device = next(self._model.token2wav.parameters()).device
        vocoder = Vocoder(
            self._model.token2wav,
            device,
            num_steps=settings.vocoder_steps,
            max_batch=settings.vocoder_max_batch,
            cuda_graphs=settings.vocoder_cuda_graphs,
        )
        return SpeechPipeline(
            self._model, batch, vocoder, settings, self.info.output_audio_sample_rate, self._start_talker
        )

    def _slot_pool(self, settings: WorkerSettings) -> slots.SlotPool | None:
        """The KV-cache slots, or None where the dynamic-cache batch runs (setting, or a family the slot
        runner cannot serve exactly)."""
        if settings.decode_runner not in ("auto", "slots", "dynamic"):
            raise ValueError(f"decode_runner: use auto, slots or dynamic, not {settings.decode_runner!r}")
        slots.sdpa_backends(settings.sdpa_backends, self._device)  # a bad setting fails at start-up
        if settings.decode_runner == "dynamic":
            return None
        reason = self._decoder.unsupported()
        if reason is not None:
            if settings.decode_runner == "slots":
                raise ValueError(f"decode_runner=slots cannot serve {type(self._model).__name__}: {reason}")
            log.info("batched decoding uses the dynamic cache: %s", reason)
            return None
        plan = slots.plan(settings, self._decoder.geometry(self._dtype), self._device)
        shape = self._decoder.position_shape(self._sample_positions())
        pool = slots.SlotPool(plan, self._decoder, self._device, shape)
        log.info("batched decoding over %s", plan.describe())
        return pool

    def _sample_positions(self) -> torch.Tensor | None:
        """The positions generate() carries for a one-token prompt (their shape tells 1-D from 3-D rope)."""
        if "position_ids" not in inspect.signature(self._gen_model.forward).parameters:
            return None
        ids = torch.zeros((1, 1), dtype=torch.long, device=self._device)
        kwargs = {
            "attention_mask": torch.ones_like(ids),
            "past_key_values": DynamicCache(config=self._gen_model.config),
        }
        return self._gen_model._prepare_position_ids_for_generation(ids, kwargs)

    def _describe_runner(self) -> None:
        backends = self._settings.sdpa_backends
        if backends == "auto":
            backends = "flash, efficient" if self._device.type == "cuda" else "torch's choice"
        if self._pool is not None:
            graphs = self._settings.cuda_graphs and self._device.type == "cuda"
            self.info.decode_runner = f"slots: {self._pool.plan.describe()}, " + (
                "CUDA graphs" if graphs else "eager"
            )
            decode = self._attn_implementation if self._attn_implementation == "eager" else "sdpa"
            self.info.attention = f"prompt {self._attn_implementation}; decode {decode} ({backends})"
        else:
            self.info.decode_runner = "dynamic cache" if self._batchable else "one request at a time"
            self.info.attention = f"prompt and decode {self._attn_implementation}"
        if self._speech is not None:
            assert self._talker_pool is not None  # the pipeline runs over them (both go in _close_speech)
            self.info.decode_runner += (
                f"; speech: batched talker over {self._talker_pool.plan.describe()}, vocoder thread"
            )
        log.info("decode runner: %s; attention: %s", self.info.decode_runner, self.info.attention)

    def _use_dynamic_cache(self, why: str) -> None:
        log.warning("batched decoding falls back to the dynamic cache: %s", why)
        self.close()
        self._describe_runner()

    def _close_speech(self) -> None:
        if self._speech is not None:
            self._speech.vocoder.close()
            self._speech = None
        if self._talker_pool is not None:
            self._talker_pool.release()
            self._talker_pool = None

    def close(self) -> None:
        self._close_speech()
        if self._pool is not None:
            self._pool.release()
            self._pool = None
            if self._device.type == "cuda":
                torch.cuda.empty_cache()

    # -- checks before a request is queued ------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        info = self.info
        if not request.messages:
            raise InvalidInput("the conversation is empty; send at least one message")
        for i, message in enumerate(request.messages):
            if message.role not in ROLES:
                raise InvalidInput(
                    f"message {i} has role {quote(message.role)}; use one of {', '.join(sorted(ROLES))}"
                )
            if not message.content:
                raise InvalidInput(f"message {i} has no content")
            for part in message.content:
                if part.type not in info.input_modalities:
                    raise InvalidInput(
                        f"{info.model_id} cannot take {part.type.value} input; it takes "
                        f"{', '.join(m.value for m in info.input_modalities)}"
                    )
        if request.use_audio_in_video and Modality.AUDIO not in info.input_modalities:
            raise InvalidInput(f"{info.model_id} cannot take audio, so a video's audio track cannot be used")
        wanted = request.mode.output
        if wanted not in info.output_modalities:
            raise InvalidInput(
                f"{info.model_id} cannot generate {wanted.value}; it generates "
                f"{', '.join(m.value for m in info.output_modalities)}"
            )
        self._family.validate(request)
        if request.speaker and request.speaker not in info.speakers:
            raise InvalidInput(
                f"unknown speaker {quote(request.speaker)}; available: {', '.join(info.speakers) or 'none'}"
            )

    # -- generation -----------------------------------------------------------------------------

    def warmup(self) -> None:
        """One tiny request through the batch path (also tells whether this model's cache can batch)."""
        request = GenerationRequest(
            messages=[Message("user", [ContentPart(Modality.TEXT, text="Hello")])],
            params=GenerationParams(max_new_tokens=2),
        )
        prepared = self.prepare(request)
        metrics, self._metrics = self._metrics, WorkerMetrics(CollectorRegistry())  # one-off costs unobserved
        try:
            self._warmup(prepared)
        finally:
            self._metrics = metrics

    def _warmup(self, prepared: Prepared) -> None:
        if self._batchable and self._pool is not None:
            try:
                self._warm_batch(prepared)
            except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
                # A family whose decoder does not take the slot runner's inputs (checked, not assumed).
                self._use_dynamic_cache(f"{type(exc).__name__}: {exc}")
        if self._batchable:
            try:
                self._warm_batch(prepared)
            except _NotBatchable as exc:
                log.warning("continuous batching is off for this model: %s", exc)
                self._batchable = False
                self.close()
                self._describe_runner()
        if self._speech is not None:
            try:
                self._warm_speech()
            except Exception as exc:  # noqa: BLE001 - speech falls back to generate(), one request at a time
                log.warning("the speech pipeline is off: %s: %s", type(exc).__name__, exc, exc_info=True)
                self._close_speech()
                self._describe_runner()
        self.run(prepared, lambda event: None, threading.Event())

    def _warm_speech(self) -> None:
        """One short spoken answer through all three stages (first talker step and vocoder call paid here)."""
        request = GenerationRequest(
            messages=[Message("user", [ContentPart(Modality.TEXT, text="Hello")])],
            params=GenerationParams(max_new_tokens=2, min_new_tokens=2),
            mode=GenerationMode.AUDIO,
        )
        ended = threading.Event()
        failures: list[BaseException | None] = []

        def done(error):
            failures.append(error)
            ended.set()

        batch = self.open_batch()
        self.start_row(batch, self.prepare(request), lambda event: None, done, threading.Event(), None)
        while len(batch):
            batch.step()
        if not ended.wait(timeout=300):
            raise RuntimeError("the vocoder did not finish the warm-up speech")
        if failures[0] is not None:
            raise failures[0]

    def _warm_batch(self, prepared: Prepared) -> None:
        failures: list[BaseException | None] = []
        batch = self.open_batch()
        self.start_row(
            batch, prepared, lambda event: None, lambda error: failures.append(error), threading.Event(), None
        )
        while len(batch):
            batch.step()
        errors = [error for error in failures if error is not None]
        if errors:
            raise errors[0]

    def generate(self, request: GenerationRequest, emit: EventSink, cancelled: threading.Event) -> None:
        """Prepares and runs one request on its own (the unbatched path)."""
        self.run(self.prepare(request), emit, cancelled)

    @torch.inference_mode()
    def prepare(self, request: GenerationRequest) -> Prepared:
        """Chat template + processor (CPU work; runs off the engine thread).

        A prompt whose text alone is surely over the prompt-token limit is refused before it is tokenized
        (no token is longer than ``_max_token_chars``), so a multi-megabyte text costs nothing. What the
        processor or chat template rejects in a request's content (an image shape it cannot resize, audio
        it cannot featurize, a template error) is the request's fault: INVALID_ARGUMENT, not INTERNAL.
        """
        budget = self._settings.max_prompt_tokens
        chars = sum(len(part.text) for m in request.messages for part in m.content if part.text)
        least = chars // (2 * self._max_token_chars)  # 2: room for normalizers that contract text
        if least > budget:
            raise LimitExceeded(
                f"the prompt is at least {least} tokens ({chars} characters of text); the limit is {budget}"
            )
        try:
            inputs = self._family.build_inputs(request, self._audio_padding)
        except (ValueError, TypeError, IndexError, jinja2.TemplateError) as exc:
            log.info("the processor refused a request: %r", exc, exc_info=True)
            raise InvalidInput(
                f"the model's processor cannot take this request's content: {type(exc).__name__}: "
                f"{str(exc)[:200]}"
            ) from exc
        inputs = inputs.to(self._device).to(dtype=self._dtype)  # BatchFeature casts floating tensors only
        prompt_len = int(inputs["input_ids"].shape[1])
        prepared = Prepared(request=request, inputs=inputs, prompt_len=prompt_len)
        pool = self._pool
        # A prompt over max_prompt_tokens is left to the scheduler's refusal (counted as too_long).
        if pool is not None and self.can_batch(prepared) and prompt_len <= self._settings.max_prompt_tokens:
            need = prompt_len + request.params.max_new_tokens
            if need > pool.slot_tokens:
                raise LimitExceeded(
                    f"the prompt ({prompt_len} tokens) plus max_new_tokens ({request.params.max_new_tokens}) needs "
                    f"{need} tokens of KV cache; this worker holds {pool.slot_tokens} per request (send less, or "
                    "ask for fewer new tokens)"
                )
            talker = self._talker_pool
            if request.mode is GenerationMode.AUDIO and talker is not None:
                need = prompt_len + 2 + self._family.talker_tokens(request)
                if need > talker.slot_tokens:
                    raise LimitExceeded(
                        f"speaking this prompt ({prompt_len} tokens) needs {need} tokens of the talker's KV cache; "
                        f"this worker holds {talker.slot_tokens} per request (send less)"
                    )
        return prepared

    def can_batch(self, prepared: Prepared) -> bool:
        mode = prepared.request.mode
        if mode is GenerationMode.AUDIO:
            return self._batchable and self._speech is not None
        return self._batchable and mode is GenerationMode.TEXT

    @torch.inference_mode()
    def run(self, prepared: Prepared, emit: EventSink, cancelled: threading.Event) -> None:
        """Runs one request with ``generate`` (speech, images, and models whose cache cannot batch)."""
        request, inputs, prompt_len = prepared.request, prepared.inputs, prepared.prompt_len
        started = time.monotonic()
        stop_flag = threading.Event()
        text = TextOutput(emit, request.params.stop, stop_flag)
        if request.return_full_text:
            text.on_text(self._tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True))
        criteria = StoppingCriteriaList([_CancelCriteria(cancelled, stop_flag)])
        if request.params.seed is not None:
            torch.manual_seed(request.params.seed)

        sampling = generate_kwargs(request.params)
        first_output_at: float | None
        if request.mode is GenerationMode.IMAGE:
            sequences, image = self._family.generate_image(inputs, request, sampling)
            if cancelled.is_set():
                return
            emit(image)
            output_tokens = 0
            first_output_at = time.monotonic()
            audio_seconds = 0.0
        else:
            streamer = TokenStreamer(self._tokenizer, text.on_text, self._metrics.token_clock(text.on_token))
            speech = waveform = None
            if request.mode is GenerationMode.TEXT:
                sequences = self._family.generate_text(inputs, request, sampling, streamer, criteria)
            else:
                if self._settings.stream_speech:
                    speech = self._family.speech_streamer(
                        request, emit, self.info.output_audio_sample_rate, cancelled
                    )
                # The talker stops on cancellation (client gone, deadline) only: a stop string ends the thinker.
                talker_criteria = StoppingCriteriaList([_CancelCriteria(cancelled, threading.Event())])
                sequences, waveform = self._family.generate_speech(
                    inputs, request, sampling, streamer, criteria, speech, talker_criteria
                )
            text.flush()
            if cancelled.is_set():
                return
            output_tokens = int(sequences.shape[1]) - prompt_len
            first_output_at = text.first_output_at
            audio_seconds = 0.0
            if speech is not None and speech.sequence > 0:
                audio_seconds = speech.seconds  # already sent, chunk by chunk
            elif waveform is not None:
                audio_seconds = self._emit_audio(waveform, emit)
            if audio_seconds and first_output_at is None:
                first_output_at = time.monotonic()

        finished = time.monotonic()
        if text.stopped_by_string:
            reason = FinishReason.STOP_SEQUENCE
        elif request.mode is not GenerationMode.IMAGE and output_tokens >= request.params.max_new_tokens:
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.STOP
        emit(
            Summary(
                finish_reason=reason,
                prompt_tokens=prompt_len,
                output_tokens=output_tokens,
                timings=Timings(
                    prefill_s=(first_output_at or finished) - started,
                    generate_s=finished - started,
                    total_s=finished - started,
                ),
                audio_seconds=audio_seconds,
            )
        )

    # -- the batch path ---------------------------------------------------------------------------

    def open_batch(self) -> Batch:
        if self._pool is not None:
            batch = slots.SlotBatch(
                self._decoder,
                self._pool,
                self._settings,
                eager_attention=self._attn_implementation == "eager",
            )
            return SpeechBatch(batch, self._speech) if self._speech is not None else batch
        s = self._settings
        return DecodeBatch(self._gen_model, self._pad_token_id, s.max_batch_size, s.max_batch_tokens)

    @torch.inference_mode()
    def start_row(
        self,
        batch: Batch,
        prepared: Prepared,
        emit: EventSink,
        done: Done,
        cancelled: threading.Event,
        deadline: float | None,
    ) -> None:
        """Prefills one request exactly as ``generate`` would and adds it to ``batch``."""
        request, inputs = prepared.request, dict(prepared.inputs)
        gen = self._gen_model
        started = time.monotonic()
        input_ids = inputs.pop("input_ids")
        if isinstance(batch, SpeechBatch):
            batch = batch.text
        speech = None
        if request.mode is GenerationMode.AUDIO:
            speech = self._speech_request(prepared, emit, done, cancelled, deadline, started, input_ids)
            emit, done = speech.thinker_emit, speech.thinker_done
        config = generation_config(self._gen_model, request.params)
        gen._prepare_special_tokens(config, True, device=input_ids.device)
        model_kwargs = {**inputs, "use_cache": True, "past_key_values": DynamicCache(config=gen.config)}
        model_kwargs.update(self._family.prefill_kwargs(request))
        if "position_ids" in inspect.signature(gen.forward).parameters:
            # As generate(): positions from the attention mask (Qwen-Omni: its multimodal rope positions).
            model_kwargs["position_ids"] = gen._prepare_position_ids_for_generation(input_ids, model_kwargs)
        chunked = (
            isinstance(batch, slots.SlotBatch) and input_ids.shape[1] > self._settings.prefill_tokens_per_step
        )
        if chunked:
            # A long prompt: the model's own forward runs up to its text decoder (media encoders, embeddings,
            # rope positions), and the decoder then runs in chunks between decode steps (SlotBatch).
            decoder_inputs = slots.decoder_inputs(
                self._decoder, lambda: gen._prefill(input_ids, config, model_kwargs, is_first_iteration=True)
            )
            if speech is not None:
                speech.tap.prompt_embeds = (
                    decoder_inputs["embeds"]
                    if "embeds" in decoder_inputs
                    else self._decoder.embed(decoder_inputs["ids"])
                )
        else:
            with _prompt_capture(self._decoder, speech.tap if speech is not None else None):
                outputs = gen._prefill(input_ids, config, model_kwargs, is_first_iteration=True)
            model_kwargs = gen._update_model_kwargs_for_generation(outputs, model_kwargs)
            if not cache_is_batchable(model_kwargs["past_key_values"]):
                raise _NotBatchable(
                    f"{type(model_kwargs['past_key_values']).__name__} cannot be padded and merged"
                )
            logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
            del outputs
            carried = {
                k: model_kwargs[k]
                for k in ("past_key_values", "attention_mask", "position_ids", "use_cache")
                if k in model_kwargs
            }

        stop_flag = threading.Event()
        text = TextOutput(emit, request.params.stop, stop_flag)
        if request.return_full_text:
            text.on_text(self._tokenizer.decode(input_ids[0], skip_special_tokens=True))
        eos = config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        generator = None
        if request.params.do_sample and request.params.seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(request.params.seed)
        row = Row(
            request=request,
            emit=emit,
            done=done,
            cancelled=cancelled,
            deadline=deadline,
            tokens=input_ids[0].tolist(),
            prompt_len=int(input_ids.shape[1]),
            max_new_tokens=request.params.max_new_tokens,
            eos=eos_ids,
            processors=gen._get_logits_processor(
                generation_config=config,
                input_ids_seq_length=int(input_ids.shape[1]),
                encoder_input_ids=input_ids,
                prefix_allowed_tokens_fn=None,
                logits_processor=LogitsProcessorList(),
                device=input_ids.device,
                model_kwargs={},
            ),
            do_sample=bool(config.do_sample),
            generator=generator,
            text=text,
            streamer=TokenStreamer(
                self._tokenizer, text.on_text, self._metrics.token_clock(text.on_token), skip_prompt=False
            ),
            started=started,
            stop_flag=stop_flag,
            speech=speech.tap if speech is not None else None,
        )
        if chunked:
            assert isinstance(batch, slots.SlotBatch)  # chunked only there
            batch.add_chunked(row, input_ids, decoder_inputs, self._settings.prefill_tokens_per_step)
        else:
            assert isinstance(batch, DecodeBatch | slots.SlotBatch)  # what open_batch gives, speech unwrapped
            batch.add(row, input_ids, carried, logits)
        if speech is not None:
            assert self._speech is not None  # speech rows exist only with the pipeline (_speech_request)
            self._speech.begin(speech)

    # -- speech as pipelined stages (speech.py) ----------------------------------------------------

    def _speech_request(
        self,
        prepared: Prepared,
        emit: EventSink,
        done: Done,
        cancelled: threading.Event,
        deadline: float | None,
        started: float,
        input_ids: torch.Tensor,
    ) -> SpeechRequest:
        request, inputs = prepared.request, prepared.inputs
        # Speech requests batch only where the pipeline exists (can_batch), and a speaking family has a
        # default speaker.
        assert self._speech is not None
        speaker = request.speaker or self._family.default_speaker()
        assert speaker is not None
        tap = ThinkerTap(
            input_ids,
            has_audio=inputs.get("input_features") is not None,
            has_images=inputs.get("pixel_values") is not None,
            has_videos=inputs.get("pixel_values_videos") is not None,
        )
        speech = SpeechRequest(
            self._speech,
            tap,
            emit=emit,
            done=done,
            cancelled=cancelled,
            deadline=deadline,
            speaker=speaker,
            seed=request.params.seed,
            started=started,
        )
        speech.prepared = prepared
        speech.trace_context = prepared.trace_context
        return speech

    def _start_talker(self, speech: SpeechRequest) -> None:
        """Prefills a speech request's talker (its first reply vector exists) and adds it to the talker batch."""
        assert speech.prepared is not None  # set by _speech_request
        request, inputs = speech.prepared.request, speech.prepared.inputs
        rope: dict[str, Any] = {"use_audio_in_video": request.use_audio_in_video}
        for name in ("image_grid_thw", "video_grid_thw", "video_second_per_grid"):
            if inputs.get(name) is not None:
                rope[name] = inputs[name]
        if inputs.get("feature_attention_mask") is not None:
            rope["audio_feature_lengths"] = torch.sum(inputs["feature_attention_mask"], dim=1)
        talker = self._model.talker
        embed = self._model.thinker.get_input_embeddings()
        marks = torch.tensor([talker.text_eos_token, talker.text_pad_token], device=self._device)
        end, pad = embed(marks)
        do_sample = self._settings.talker_do_sample
        generator = None
        if do_sample and request.params.seed is not None:
            generator = torch.Generator(device=self._device).manual_seed(request.params.seed)
        feed = TalkerFeed(speech.tap, end, pad, speech.on_code)
        assert self._speech is not None  # the pipeline starts this talker
        start_talker(
            self._model,
            self._speech.talker,
            speech.tap,
            feed,
            speaker=speech.speaker,
            max_new_tokens=self._family.talker_tokens(request),
            do_sample=do_sample,
            generator=generator,
            rope_inputs=rope,
            done=speech.talker_done,
            cancelled=speech.talker_cancelled,
            deadline=speech.deadline,
            request=request,
        )
        speech.tap.drop_prompt()
        speech.talker_began()

    def _emit_audio(self, waveform: torch.Tensor, emit: EventSink) -> float:
        samples = waveform.detach().float().reshape(-1).cpu().numpy()
        if not np.all(np.isfinite(samples)):
            raise LimitExceeded("speech synthesis produced invalid samples")  # pragma: no cover
        rate = self.info.output_audio_sample_rate
        step = max(1, int(rate * self._settings.audio_chunk_seconds))
        for sequence, start in enumerate(range(0, len(samples), step)):
            emit(AudioChunk(samples=samples[start : start + step], sample_rate=rate, sequence=sequence))
        return len(samples) / rate


@contextlib.contextmanager
def _prompt_capture(family: DecoderFamily, tap: ThinkerTap | None) -> Iterator[None]:
    """While the prompt is prefilled, keeps what the text decoder is given (the prompt's embeddings) and
    its last hidden states for a speech request's talker."""
    if tap is None:
        yield
        return

    def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        embeds = kwargs.get("inputs_embeds")
        tap.prompt_embeds = embeds if embeds is not None else family.embed(kwargs["input_ids"])

    def after(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        tap.add_prompt_hidden(output.last_hidden_state)

    assert family.decoder is not None  # a speech request's thinker runs on the slot runner
    handles = [
        family.decoder.register_forward_pre_hook(before, with_kwargs=True),
        family.decoder.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_tuple(value: str | Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)
