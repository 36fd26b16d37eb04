"""The interface a model family implements (``families/__init__.py`` lists the families)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from omnigate.conversation import GenerationMode, GenerationRequest, ImageOutput, Modality
from omnigate.errors import InvalidInput
from omnigate_worker.engine import inputs as model_inputs

if TYPE_CHECKING:
    from omnigate_worker.engine.base import EventSink
    from omnigate_worker.settings import WorkerSettings


class ModelFamily:
    """The generic behaviour; a family overrides what it changes.

    ``text_model`` is the module whose ``generate`` writes the text (and whose ``_prefill`` the batched
    decode loop calls); the engine batches text through it whatever the family."""

    architectures: tuple[str, ...] = ()  # model class names this family serves

    # ``model`` and ``processor`` are transformers objects (Any: what a family reads of them is its own).
    def __init__(self, model: Any, processor: Any, settings: WorkerSettings) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings

    @classmethod
    def matches(cls, model: Any) -> bool:
        return type(model).__name__ in cls.architectures

    # -- what the model is ---------------------------------------------------------------------------

    @property
    def text_model(self) -> Any:
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

    def build_inputs(self, request: GenerationRequest, audio_padding: int | None) -> Any:
        """The processor's model inputs for a request (a BatchFeature of tensors with ``input_ids``): the chat
        template rendered, then the processor over the decoded media (``inputs.build``). A family whose
        processor takes media another way overrides this; content the processor refuses is InvalidInput."""
        inputs, _prompt = model_inputs.build(self.processor, request, audio_padding=audio_padding)
        return inputs

    def prefill_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """Model kwargs the text model's prefill takes beside the processor's outputs."""
        return {}

    # -- generation ----------------------------------------------------------------------------------

    def generate_text(
        self, inputs: Any, request: GenerationRequest, sampling: dict[str, Any], streamer: Any, criteria: Any
    ) -> Any:
        """Sequences (prompt included) from ``generate`` for a text answer."""
        return self.model.generate(
            **inputs,
            max_new_tokens=request.params.max_new_tokens,
            streamer=streamer,
            stopping_criteria=criteria,
            **sampling,
        )

    def generate_speech(
        self,
        inputs: Any,
        request: GenerationRequest,
        sampling: dict[str, Any],
        streamer: Any,
        criteria: Any,
        talker_streamer: Any,
        talker_criteria: Any,
    ) -> tuple[Any, Any]:
        """(sequences, waveform or None) from ``generate`` for a spoken answer."""
        raise InvalidInput(f"{type(self.model).__name__} cannot generate speech")

    def speech_streamer(
        self, request: GenerationRequest, emit: EventSink, sample_rate: int, cancelled: threading.Event
    ) -> Any:
        """A ``talker_streamer`` for ``generate`` that sends speech chunk by chunk while it is written
        (``stream_speech``), or None: the speech then comes as one waveform at the end."""
        return None

    def generate_image(
        self, inputs: Any, request: GenerationRequest, sampling: dict[str, Any]
    ) -> tuple[object, ImageOutput]:
        """(tokens, the PNG) for an image answer."""
        raise InvalidInput(f"{type(self.model).__name__} cannot generate an image")

    def wants_speech_pipeline(self) -> bool:
        """Whether speech runs as pipelined stages (thinker row, batched talker, vocoder thread)."""
        return False

    def talker_tokens(self, request: GenerationRequest) -> int:
        """Codec codes a spoken answer may take (the families whose talker the engine runs say)."""
        raise NotImplementedError(f"{type(self.model).__name__} has no talker")


def is_speech(request: GenerationRequest) -> bool:
    return request.mode is GenerationMode.AUDIO
