"""Translates worker protobuf messages to and from plain Python objects (the only module that does)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from omnigate.conversation import (
    AudioChunk,
    ContentPart,
    Event,
    GenerationParams,
    GenerationRequest,
    ImageOutput,
    Message,
    Modality,
    ModelInfo,
    Summary,
    TextDelta,
)
from omnigate.enums import WORKER_FINISH_REASONS, WORKER_MODALITIES, WORKER_MODES
from omnigate.errors import InvalidInput, LimitExceeded
from omnigate.grpc_server import Undecodable
from omnigate.media import Audio, Image, Video
from omnigate.validation import RequestLimits, check_counts
from omnigate.worker.v1 import worker_pb2 as pb


@dataclass
class _Declared:
    """A media item declared in the spec, waiting for its bytes."""

    nbytes: int
    build: object  # callable(bytes) -> media object, set by the part that declared it


async def read_request(
    requests: AsyncIterator[pb.GenerateRequest], max_media_bytes: int, limits: RequestLimits
) -> GenerationRequest:
    """Reads a whole Generate request stream (spec, then media chunks) into a GenerationRequest."""
    spec: pb.GenerateSpec | None = None
    declared: dict[int, int] = {}
    buffers: dict[int, bytearray] = {}
    total = 0
    async for message in requests:
        if isinstance(message, Undecodable):
            raise InvalidInput(message.message)
        kind = message.WhichOneof("payload")
        if kind == "spec":
            if spec is not None:
                raise InvalidInput("the Generate stream carried two specs; send exactly one, first")
            spec = message.spec
            check_counts(len(spec.messages), sum(len(m.content) for m in spec.messages), limits)
            declared = _declared_sizes(spec)
            declared_total = sum(declared.values())
            if declared_total > max_media_bytes:
                raise LimitExceeded(
                    f"the request's decoded media is {declared_total} bytes; the limit is {max_media_bytes} bytes"
                )
            buffers = {media_id: bytearray() for media_id in declared}
        elif kind == "media_chunk":
            if spec is None:
                raise InvalidInput("a media chunk arrived before the spec; send the spec first")
            chunk = message.media_chunk
            if chunk.media_id not in buffers:
                raise InvalidInput(f"media chunk for undeclared media_id {chunk.media_id}")
            buffer = buffers[chunk.media_id]
            if len(buffer) + len(chunk.data) > declared[chunk.media_id]:
                raise InvalidInput(
                    f"media {chunk.media_id} got more bytes than its declared {declared[chunk.media_id]}"
                )
            buffer.extend(chunk.data)
            total += len(chunk.data)
        else:
            raise InvalidInput("empty Generate stream message; set spec or media_chunk")
    if spec is None:
        raise InvalidInput("the Generate stream ended without a spec")
    for media_id, size in declared.items():
        if len(buffers[media_id]) != size:
            raise InvalidInput(f"media {media_id} has {len(buffers[media_id])} bytes; {size} were declared")
    return _build_request(spec, buffers)


def _audio_bytes(ref: pb.AudioRef) -> int:
    return int(ref.num_samples) * 4


def _declared_sizes(spec: pb.GenerateSpec) -> dict[int, int]:
    sizes: dict[int, int] = {}

    def declare(media_id: int, nbytes: int) -> None:
        if media_id in sizes:
            raise InvalidInput(f"media_id {media_id} is declared twice")
        sizes[media_id] = nbytes

    for message in spec.messages:
        for part in message.content:
            kind = part.WhichOneof("part")
            if kind == "image":
                declare(part.image.media_id, part.image.width * part.image.height * 3)
            elif kind == "audio":
                declare(part.audio.media_id, _audio_bytes(part.audio))
            elif kind == "video":
                v = part.video
                declare(v.media_id, v.num_frames * v.width * v.height * 3)
                if v.HasField("audio"):
                    declare(v.audio.media_id, _audio_bytes(v.audio))
    return sizes


def _build_request(spec: pb.GenerateSpec, buffers: dict[int, bytearray]) -> GenerationRequest:
    def audio(ref: pb.AudioRef) -> Audio:
        if ref.sample_rate == 0:
            raise InvalidInput("audio sample_rate must be > 0")
        return Audio(
            np.frombuffer(bytes(buffers[ref.media_id]), dtype="<f4").astype(np.float32), ref.sample_rate
        )

    messages = []
    for message in spec.messages:
        parts = []
        for part in message.content:
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append(ContentPart(Modality.TEXT, text=part.text))
            elif kind == "image":
                ref = part.image
                if ref.width == 0 or ref.height == 0:
                    raise InvalidInput("image width and height must be > 0")
                pixels = np.frombuffer(bytes(buffers[ref.media_id]), dtype=np.uint8).reshape(
                    ref.height, ref.width, 3
                )
                parts.append(ContentPart(Modality.IMAGE, image=Image(pixels)))
            elif kind == "audio":
                parts.append(ContentPart(Modality.AUDIO, audio=audio(part.audio)))
            elif kind == "video":
                v = part.video
                if v.num_frames == 0 or v.width == 0 or v.height == 0:
                    raise InvalidInput("video must have at least one frame with non-zero width and height")
                if len(v.timestamps) != v.num_frames:
                    raise InvalidInput(f"video has {v.num_frames} frames but {len(v.timestamps)} timestamps")
                frames = np.frombuffer(bytes(buffers[v.media_id]), dtype=np.uint8).reshape(
                    v.num_frames, v.height, v.width, 3
                )
                video = Video(
                    frames=frames,
                    timestamps_s=list(v.timestamps),
                    sampled_fps=v.sampled_fps,
                    source_fps=v.source_fps,
                    duration_s=v.duration_s,
                    source_num_frames=int(v.source_num_frames),
                    audio=audio(v.audio) if v.HasField("audio") else None,
                )
                parts.append(ContentPart(Modality.VIDEO, video=video))
            else:
                raise InvalidInput("a content part has no type; set text, image, audio or video")
        messages.append(Message(role=message.role, content=parts))

    mode = WORKER_MODES.get(spec.generation_mode)
    if mode is None:
        raise InvalidInput(f"unknown generation_mode {spec.generation_mode}; use {WORKER_MODES.names}")
    p = spec.parameters
    params = GenerationParams(
        max_new_tokens=p.max_new_tokens,
        min_new_tokens=p.min_new_tokens,
        do_sample=p.do_sample,
        temperature=p.temperature if p.HasField("temperature") else None,
        top_p=p.top_p if p.HasField("top_p") else None,
        top_k=p.top_k if p.HasField("top_k") else None,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else None,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop),
    )
    return GenerationRequest(
        messages=messages,
        params=params,
        mode=mode,
        return_full_text=spec.return_full_text,
        use_audio_in_video=spec.use_audio_in_video,
        speaker=spec.speaker or None,
        request_id=spec.request_id,
    )


def event_to_proto(event: Event) -> pb.GenerateResponse:
    if isinstance(event, TextDelta):
        return pb.GenerateResponse(text=pb.TextDelta(text=event.text))
    if isinstance(event, AudioChunk):
        pcm = (
            (np.clip(np.asarray(event.samples, dtype=np.float32), -1.0, 1.0) * 32767.0)
            .astype("<i2")
            .tobytes()
        )
        return pb.GenerateResponse(
            audio=pb.AudioChunk(pcm_s16le=pcm, sample_rate=event.sample_rate, sequence=event.sequence)
        )
    if isinstance(event, ImageOutput):
        return pb.GenerateResponse(
            image=pb.GeneratedImage(
                data=event.data, mime_type=event.mime_type, width=event.width, height=event.height
            )
        )
    if isinstance(event, Summary):
        return pb.GenerateResponse(
            summary=pb.Summary(
                finish_reason=WORKER_FINISH_REASONS.to_proto(event.finish_reason),
                prompt_tokens=event.prompt_tokens,
                output_tokens=event.output_tokens,
                queue_s=event.timings.queue_s,
                time_to_first_output_s=event.timings.prefill_s,
                generate_s=event.timings.generate_s,
                audio_seconds=event.audio_seconds,
            )
        )
    raise TypeError(f"unknown event {type(event).__name__}")


def model_info_to_proto(
    info: ModelInfo, max_new_tokens: int, max_request_media_bytes: int
) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        model_id=info.model_id,
        architecture=info.architecture,
        input_modalities=[WORKER_MODALITIES.to_proto(m) for m in info.input_modalities],
        output_modalities=[WORKER_MODALITIES.to_proto(m) for m in info.output_modalities],
        input_audio_sample_rate=info.input_audio_sample_rate,
        output_audio_sample_rate=info.output_audio_sample_rate,
        speakers=info.speakers,
        max_new_tokens=max_new_tokens,
        max_request_media_bytes=max_request_media_bytes,
        device=info.device,
        max_image_pixels=info.max_image_pixels,
        max_video_frame_pixels=info.max_video_frame_pixels,
        attention=info.attention,
        decode_runner=info.decode_runner,
    )
