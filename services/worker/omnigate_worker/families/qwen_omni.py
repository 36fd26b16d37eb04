"""Qwen2.5-Omni (``Qwen2_5OmniForConditionalGeneration``): text, image, audio and video in; text and speech out.

The model is a thinker (text), a talker (speech codec codes) and token2wav (codes to a 24 kHz waveform).
What the worker does for it (transformers 5.23, each reproduced):

- The thinker writes the text: it is the ``text_model`` the engine batches. ``generate`` ignores
  ``max_new_tokens``: the request's limit goes to ``thinker_max_new_tokens``, the speech length to
  ``talker_max_new_tokens`` (``talker_tokens``), and text answers pass ``generation_mode="text"`` so the
  talker does not run. Text streams through ``thinker_streamer`` (a plain ``streamer`` also gets codec ids).
- Speech with image or video input: visual inputs (pixels and their grids) go to ``generate`` as
  ``thinker_*`` (un-prefixed, ``generate`` also hands them to the talker, which rejects them).
- Speech needs ``max_new_tokens >= 2`` (the talker crashes on a one-token reply) and an empty reply gives no
  audio instead of an error.
- Its processor pads every audio to the feature extractor's 300 s; the worker pads to the audio's own
  length (``audio_padding``), which gives the same output for less work.
- Speech runs as pipelined stages where the slot runner serves the thinker (``speech/``: ``pipeline.py``,
  ``talker.py``, ``vocoder.py``); this module's ``generate_speech`` is the one-request path through ``generate``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import torch

from omnigate.conversation import GenerationMode, GenerationRequest, Modality
from omnigate.errors import InvalidInput
from omnigate_worker.engine import inputs as model_inputs
from omnigate_worker.families.base import ModelFamily

if TYPE_CHECKING:
    from omnigate_worker.engine.base import EventSink
    from omnigate_worker.settings import WorkerSettings

log = logging.getLogger(__name__)

OUTPUT_AUDIO_RATE = 24000  # token2wav's rate (not in the config)


class QwenOmniFamily(ModelFamily):
    architectures = ("Qwen2_5OmniForConditionalGeneration",)

    @classmethod
    def matches(cls, model: Any) -> bool:
        return hasattr(model, "thinker") and hasattr(model, "speaker_map")

    def __init__(self, model: Any, processor: Any, settings: WorkerSettings) -> None:
        super().__init__(model, processor, settings)
        if self.has_talker and model.token2wav.dtype != torch.float32:
            model.token2wav.float()  # as generate() does before synthesis: token2wav runs in fp32

    @property
    def has_talker(self) -> bool:
        return bool(getattr(self.model, "has_talker", False))

    @property
    def text_model(self):
        return self.model.thinker

    def output_modalities(self, declared: list[Modality]) -> list[Modality]:
        if not self.has_talker:
            return [m for m in declared if m is not Modality.AUDIO]
        return declared

    @property
    def output_audio_rate(self) -> int:
        return OUTPUT_AUDIO_RATE if self.has_talker else 0

    @property
    def speakers(self) -> list[str]:
        return sorted(getattr(self.model, "speaker_map", {}) or {})

    def default_speaker(self) -> str | None:
        speakers = list(getattr(self.model, "speaker_map", {}) or {})
        return "Chelsie" if "Chelsie" in speakers else (speakers[0] if speakers else None)

    def audio_padding(self) -> int | None:
        return model_inputs.audio_padding_for(self.processor)

    def talker_tokens(self, request: GenerationRequest) -> int:
        """Codec codes the talker may write for this request (bounds the speech's length)."""
        s = self.settings
        return min(s.max_talker_tokens, request.params.max_new_tokens * s.talker_tokens_per_text_token)

    def validate(self, request: GenerationRequest) -> None:
        if request.mode is GenerationMode.AUDIO and request.params.max_new_tokens < 2:
            # transformers 5.23: Qwen2.5-Omni's talker crashes ("torch.cat(): expected a non-empty list")
            # when the thinker produced a single token, so speech needs room for at least two.
            raise InvalidInput("speech output needs max_new_tokens >= 2")

    def prefill_kwargs(self, request: GenerationRequest) -> dict:
        return {"use_audio_in_video": request.use_audio_in_video}

    def speech_streamer(
        self, request: GenerationRequest, emit: EventSink, sample_rate: int, cancelled: threading.Event
    ) -> Any:
        from omnigate_worker.speech.pipeline import SpeechStreamer  # the speech stages import the families
        from omnigate_worker.speech.talker import TALKER_STOP_CODES

        speaker = request.speaker or self.default_speaker()
        settings = self.settings
        return SpeechStreamer(
            self.model.token2wav,
            self.model.speaker_map[speaker],
            emit,
            sample_rate,
            settings.speech_chunk_codes,
            settings.speech_context_codes,
            set(TALKER_STOP_CODES),
            cancelled,
        )

    def wants_speech_pipeline(self) -> bool:
        return self.has_talker and self.settings.stream_speech

    def _thinker_kwargs(
        self, request: GenerationRequest, sampling: dict[str, Any], streamer: Any, criteria: Any
    ) -> dict[str, Any]:
        kwargs = {f"thinker_{k}": v for k, v in sampling.items()}
        kwargs.update(
            thinker_max_new_tokens=request.params.max_new_tokens,
            thinker_streamer=streamer,
            thinker_stopping_criteria=criteria,
            use_audio_in_video=request.use_audio_in_video,
        )
        return kwargs

    def generate_text(self, inputs, request, sampling, streamer, criteria):
        kwargs = self._thinker_kwargs(request, sampling, streamer, criteria)
        return self.model.generate(**inputs, generation_mode="text", **kwargs)

    def generate_speech(
        self, inputs, request, sampling, streamer, criteria, talker_streamer, talker_criteria
    ):
        kwargs = self._thinker_kwargs(request, sampling, streamer, criteria)
        model_kwargs = dict(inputs)
        for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            # transformers 5.23: with speech output, visual inputs must be addressed to the thinker or
            # generate() fails with "model_kwargs are not used: pixel_values".
            if name in model_kwargs:
                model_kwargs[f"thinker_{name}"] = model_kwargs.pop(name)
        if talker_streamer is not None:
            kwargs["talker_streamer"] = talker_streamer
        try:
            return self.model.generate(
                **model_kwargs,
                generation_mode="audio",
                speaker=request.speaker or self.default_speaker(),
                talker_max_new_tokens=self.talker_tokens(request),
                talker_do_sample=self.settings.talker_do_sample,
                talker_stopping_criteria=talker_criteria,
                **kwargs,
            )
        except RuntimeError as exc:
            # transformers 5.23: when the thinker's first token is end-of-sequence there is nothing to
            # speak, and the talker crashes on an empty reply instead of returning no audio.
            if "expected a non-empty list of Tensors" not in str(exc):
                raise
            log.info("request %s: the reply is empty, so there is no speech", request.request_id)
            return inputs["input_ids"], None
