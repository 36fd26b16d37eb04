"""Qwen3-Omni (``Qwen3OmniMoeForConditionalGeneration``): text, image, audio and video in; text and speech out.

The model is a MoE thinker (text), a MoE talker with a code predictor (multi-codebook speech codes) and
code2wav (codes to a 24 kHz waveform, 1920 samples per code). What the worker does for it (transformers
5.23, each reproduced on the tiny checkpoint):

- The thinker writes the text: it is the ``text_model`` the engine batches (its KV cache is a plain dynamic
  cache; its 4-row rope positions are what ``generate`` carries). Its decoder adds the vision tower's
  deepstack features to the hidden states of its first layers (``visual_pos_masks``,
  ``deepstack_visual_embeds``); the slot runner's chunked prefill of a long prompt hands the decoder only
  embeddings and positions, so an image or video prompt longer than ``prefill_tokens_per_step`` would lose
  them (reproduced: different greedy text with ``prefill_tokens_per_step=8``). The thinker's decoder is
  therefore registered with the slot runner as unsupported, and text batches over the dynamic cache, exact
  at every prompt length. ``generate`` ignores ``max_new_tokens``:
  the request's limit goes to ``thinker_max_new_tokens``, the speech length to ``talker_max_new_tokens``, and
  text answers pass ``generation_mode="text"`` so the talker does not run.
- ``generate`` stops the thinker at a hard-coded end-of-turn id (``thinker_eos_token_id=151645``, the real
  vocabulary's ``<|im_end|>``) whatever the checkpoint says: the family passes the thinker's own
  ``generation_config.eos_token_id``, the one the engine's batched decode stops on.
- Speakers are ``config.talker_config.speaker_id`` (lower-case names; ``generate`` lower-cases the request's);
  ``generate``'s default is ``ethan``.
- Speech needs ``max_new_tokens >= 2`` (the talker's prompt takes the thinker's first reply token from a
  hidden state that exists only once a second token was generated), an empty reply gives no audio instead of
  a crash, and the talker may not end before its first code (``talker_min_new_tokens=1``: a first code of
  end-of-speech makes ``generate`` crash stacking an empty list of codes).
- Speech with audio (a part, or a video's track) beside an image or a video is refused: the talker's rope
  index then reads ``config.audio_config``, which its config lacks, and ``generate`` raises AttributeError.
- Speech comes as one waveform at the end of ``generate`` (sent in chunks then): ``speech_streamer`` and the
  speech pipeline are Qwen2.5-Omni's (its token2wav and speaker map), so ``stream_speech`` changes nothing
  here.
"""

from __future__ import annotations

import logging
from typing import Any

from omnigate.conversation import GenerationMode, GenerationRequest, Modality
from omnigate.errors import InvalidInput
from omnigate_worker.engine import decoders
from omnigate_worker.families.base import ModelFamily

log = logging.getLogger(__name__)

OUTPUT_AUDIO_RATE = 24000  # code2wav: 1920 samples per code at 12.5 codes per second (not in the config)
GENERATE_DEFAULT_SPEAKER = "ethan"  # Qwen3OmniMoeForConditionalGeneration.generate's default


class Qwen3OmniThinkerDecoder(decoders.DecoderFamily):
    """The thinker's text decoder, as the slot runner sees it: not served (module docstring)."""

    def unsupported(self) -> str | None:
        return (
            "its decoder adds deepstack visual features inside its first layers, which the chunked prefill "
            "of long prompts does not pass on"
        )


decoders.FAMILIES["Qwen3OmniMoeThinkerForConditionalGeneration"] = Qwen3OmniThinkerDecoder


class Qwen3OmniFamily(ModelFamily):
    architectures = ("Qwen3OmniMoeForConditionalGeneration",)

    @property
    def has_talker(self) -> bool:
        return bool(getattr(self.model, "has_talker", False))

    @property
    def can_speak(self) -> bool:
        """Speech through ``generate``: the model has its talker."""
        return self.has_talker

    @property
    def text_model(self):
        return self.model.thinker

    def output_modalities(self, declared: list[Modality]) -> list[Modality]:
        if not self.can_speak:
            return [m for m in declared if m is not Modality.AUDIO]
        return declared

    @property
    def output_audio_rate(self) -> int:
        return OUTPUT_AUDIO_RATE if self.can_speak else 0

    def _speaker_ids(self) -> dict:
        talker_config = getattr(self.model.config, "talker_config", None)
        return dict(getattr(talker_config, "speaker_id", None) or {})

    @property
    def speakers(self) -> list[str]:
        return sorted(self._speaker_ids()) if self.can_speak else []

    def default_speaker(self) -> str | None:
        speakers = list(self._speaker_ids())
        if GENERATE_DEFAULT_SPEAKER in speakers:
            return GENERATE_DEFAULT_SPEAKER
        return speakers[0] if speakers else None

    def talker_tokens(self, request: GenerationRequest) -> int:
        """Codec steps the talker may take for this request (bounds the speech's length)."""
        s = self.settings
        return min(s.max_talker_tokens, request.params.max_new_tokens * s.talker_tokens_per_text_token)

    def validate(self, request: GenerationRequest) -> None:
        if request.mode is not GenerationMode.AUDIO:
            return
        if request.params.max_new_tokens < 2:
            # transformers 5.23: with a one-token reply generate() fails building the talker's prompt
            # ("The size of tensor a (8) must match the size of tensor b (9)").
            raise InvalidInput("speech output needs max_new_tokens >= 2")
        kinds = {part.type for message in request.messages for part in message.content}
        has_audio = Modality.AUDIO in kinds or (request.use_audio_in_video and Modality.VIDEO in kinds)
        if has_audio and kinds & {Modality.IMAGE, Modality.VIDEO}:
            # transformers 5.23: the talker's rope index reads `config.audio_config.n_window`, which only the
            # thinker's config has ("'Qwen3OmniMoeTalkerConfig' object has no attribute 'audio_config'"),
            # whenever audio (a part or a video's track) comes with an image or a video.
            raise InvalidInput(
                "this model cannot speak an answer to audio together with images or video (transformers "
                "5.23's Qwen3-Omni talker fails on that mix); ask for text, or send the audio or the "
                "pictures alone"
            )

    def prefill_kwargs(self, request: GenerationRequest) -> dict:
        return {"use_audio_in_video": request.use_audio_in_video}

    def _thinker_kwargs(
        self, request: GenerationRequest, sampling: dict[str, Any], streamer: Any, criteria: Any
    ) -> dict[str, Any]:
        kwargs = {f"thinker_{k}": v for k, v in sampling.items()}
        kwargs.update(
            thinker_max_new_tokens=request.params.max_new_tokens,
            thinker_eos_token_id=self.text_model.generation_config.eos_token_id,
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
        if not self.can_speak:  # the engine refuses audio output first; kept for direct callers
            raise InvalidInput(f"{type(self.model).__name__} was loaded without its talker")
        kwargs = self._thinker_kwargs(request, sampling, streamer, criteria)
        try:
            sequences, waveform = self.model.generate(
                **inputs,
                generation_mode="audio",
                speaker=request.speaker or self.default_speaker(),
                talker_max_new_tokens=self.talker_tokens(request),
                talker_min_new_tokens=1,
                talker_do_sample=self.settings.talker_do_sample,
                talker_stopping_criteria=talker_criteria,
                **kwargs,
            )
        except RuntimeError as exc:
            # transformers 5.23: when the thinker stopped after one token (end-of-turn first, or a stop
            # string) the talker's prompt cannot be built; there is no reply to speak.
            if not _raised_in(exc, "_get_talker_assistant_parts"):
                raise
            log.info("request %s: the reply is too short to speak, so there is no speech", request.request_id)
            return inputs["input_ids"], None
        return sequences, waveform


def _raised_in(exc: BaseException, function: str) -> bool:
    """Whether ``function`` is on the traceback of ``exc``."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False
