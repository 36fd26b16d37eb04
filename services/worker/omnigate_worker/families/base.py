"""The interface a model family implements (``families/__init__.py`` lists the families)."""

from __future__ import annotations

from omnigate.conversation import GenerationMode, GenerationRequest, ImageOutput, Modality
from omnigate.errors import InvalidInput


class ModelFamily:
    """The generic behaviour; a family overrides what it changes.

    ``text_model`` is the module whose ``generate`` writes the text (and whose ``_prefill`` the batched
    decode loop calls); the engine batches text through it whatever the family."""

    architectures: tuple[str, ...] = ()  # model class names this family serves

    def __init__(self, model, processor, settings) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings

    @classmethod
    def matches(cls, model) -> bool:
        return type(model).__name__ in cls.architectures

    # -- what the model is ---------------------------------------------------------------------------

    @property
    def text_model(self):
        return self.model

    def output_modalities(self, declared: list[Modality]) -> list[Modality]:
        """The outputs this loaded model can produce (``declared``: the class's ``output_modalities``)."""
        return declared

    @property
    def output_audio_rate(self) -> int:
        return 0

    @property
    def speakers(self) -> list[str]:
        return []

    def default_speaker(self) -> str | None:
        return None

    def audio_padding(self) -> int | None:
        """Feature frames to pad audio to (None: the processor's own padding)."""
        return None

    # -- requests ------------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Family-specific refusals (InvalidInput), after the engine's generic checks."""

    def prefill_kwargs(self, request: GenerationRequest) -> dict:
        """Model kwargs the text model's prefill takes beside the processor's outputs."""
        return {}

    # -- generation ----------------------------------------------------------------------------------

    def generate_text(self, inputs, request: GenerationRequest, sampling: dict, streamer, criteria):
        """Sequences (prompt included) from ``generate`` for a text answer."""
        return self.model.generate(
            **inputs,
            max_new_tokens=request.params.max_new_tokens,
            streamer=streamer,
            stopping_criteria=criteria,
            **sampling,
        )

    def generate_speech(
        self, inputs, request, sampling, streamer, criteria, talker_streamer, talker_criteria
    ):
        """(sequences, waveform or None) from ``generate`` for a spoken answer."""
        raise InvalidInput(f"{type(self.model).__name__} cannot generate speech")

    def generate_image(
        self, inputs, request: GenerationRequest, sampling: dict
    ) -> tuple[object, ImageOutput]:
        """(tokens, the PNG) for an image answer."""
        raise InvalidInput(f"{type(self.model).__name__} cannot generate an image")

    def wants_speech_pipeline(self) -> bool:
        """Whether speech runs as pipelined stages (thinker row, batched talker, vocoder thread)."""
        return False


def is_speech(request: GenerationRequest) -> bool:
    return request.mode is GenerationMode.AUDIO
