"""A generation request and its streamed events as plain Python objects.

The shape follows Hugging Face's chat format ("Multimodal Generation" guide): a list of messages, each
with a role and typed content parts. Servicers convert protobuf messages to and from these types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from omnigate.media import Audio, Image, Video


class Modality(enum.StrEnum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    VIDEO = "video"


class GenerationMode(enum.StrEnum):
    TEXT = "text"
    AUDIO = "audio"
    IMAGE = "image"

    @property
    def output(self) -> Modality:
        """The modality this mode generates (text mode: text; audio mode: speech, with its text)."""
        return Modality(self.value)


class FinishReason(enum.StrEnum):
    STOP = "stop"  # the model's end of sequence
    LENGTH = "length"  # max_new_tokens reached
    STOP_SEQUENCE = "stop_sequence"  # one of the request's stop strings


@dataclass
class ContentPart:
    """One typed part of a message: exactly one of text / image / audio / video is set."""

    type: Modality
    text: str | None = None
    image: Image | None = None
    audio: Audio | None = None
    video: Video | None = None


@dataclass
class Message:
    role: str  # "system", "user" or "assistant"
    content: list[ContentPart]


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # generate at least this many tokens (benchmarks fix the output length with it)
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationRequest:
    messages: list[Message]
    params: GenerationParams = field(default_factory=GenerationParams)
    mode: GenerationMode = GenerationMode.TEXT
    return_full_text: bool = False
    video_fps: float | None = None
    use_audio_in_video: bool = False
    speaker: str | None = None
    request_id: str = ""


# ---- streamed events -------------------------------------------------------------------------


@dataclass
class TextDelta:
    text: str


@dataclass
class AudioChunk:
    samples: object  # numpy float32 array, mono
    sample_rate: int
    sequence: int


@dataclass
class ImageOutput:
    data: bytes  # encoded image
    mime_type: str
    width: int
    height: int


@dataclass
class Timings:
    queue_s: float = 0.0
    prefill_s: float = 0.0  # time to first token after the request started running
    generate_s: float = 0.0  # total time in generate (text + speech/image)
    total_s: float = 0.0


@dataclass
class Summary:
    finish_reason: FinishReason
    prompt_tokens: int
    output_tokens: int
    timings: Timings = field(default_factory=Timings)
    audio_seconds: float = 0.0


Event = TextDelta | AudioChunk | ImageOutput | Summary


@dataclass
class ModelInfo:
    """What the served model takes and produces (worker's GetModelInfo, as plain data)."""

    model_id: str
    architecture: str
    input_modalities: list[Modality]
    output_modalities: list[Modality]
    input_audio_sample_rate: int = 0
    output_audio_sample_rate: int = 0
    speakers: list[str] = field(default_factory=list)
    device: str = "cpu"
    max_new_tokens: int = 0
    max_request_media_bytes: int = 0
    max_image_pixels: int = 0  # what the processor keeps of one image (0 = unknown)
    max_video_frame_pixels: int = 0  # what the processor keeps of one video frame (0 = unknown)
    attention: str = ""  # the attention kernels of the prompt and the decode step
    decode_runner: str = ""  # how batched decoding runs (KV slots and CUDA graphs, or the dynamic cache)
