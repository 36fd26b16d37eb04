"""Translates the gateway's protobuf messages (public API and worker API) to and from plain objects.

The only gateway module that touches ``*_pb2`` besides the servicer and the worker client.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from omnigate.conversation import (
    ContentPart,
    GenerationParams,
    GenerationRequest,
    Message,
    Modality,
    ModelInfo,
)
from omnigate.enums import (
    PUBLIC_FINISH_REASONS,
    PUBLIC_MODALITIES,
    PUBLIC_MODES,
    WORKER_FINISH_REASONS,
    WORKER_MODALITIES,
    WORKER_MODES,
)
from omnigate.errors import InvalidInput
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate.media import Audio
from omnigate.validation import RequestLimits, check_counts, check_request
from omnigate.worker.v1 import worker_pb2 as wk


@dataclass
class MediaRef:
    """Where one media part of a request comes from (exactly one of url, data, path)."""

    modality: Modality
    url: str | None = None
    data: bytes | None = None
    path: str | None = None

    @property
    def source_kind(self) -> str:
        return "url" if self.url is not None else "inline" if self.data is not None else "path"


@dataclass
class IncomingRequest:
    """A public request parsed into plain objects; media parts still to be fetched and decoded."""

    request: GenerationRequest
    media: list[tuple[ContentPart, MediaRef]]  # each part is filled in once its media is decoded
    load_audio_from_video: bool
    video_fps: float


def parse_request(
    message: gw.GenerateRequest,
    default_max_new_tokens: int,
    default_fps: float,
    limits: RequestLimits | None = None,
    max_new_tokens_limit: int | None = None,
) -> IncomingRequest:
    """Checks the request (shape, then every parameter against its domain: ``omnigate.validation``) and
    turns it into plain objects (no I/O)."""
    if not message.messages:
        raise InvalidInput("the conversation is empty; send at least one message")
    if limits is not None:  # before anything is built from an oversized conversation
        check_counts(len(message.messages), sum(len(m.content) for m in message.messages), limits)
    mode = PUBLIC_MODES.get(message.generation_mode)
    if mode is None:
        if message.generation_mode == PUBLIC_MODES.unspecified:
            raise InvalidInput(f"generation_mode is not set; use {PUBLIC_MODES.names}")
        raise InvalidInput(f"unknown generation_mode {message.generation_mode}; use {PUBLIC_MODES.names}")
    fps = message.video.fps if message.HasField("video") and message.video.fps else default_fps
    if not (math.isfinite(fps) and fps > 0):
        raise InvalidInput(f"video fps is {fps!r}; it must be a number greater than 0")

    media: list[tuple[ContentPart, MediaRef]] = []
    messages = []
    for i, msg in enumerate(message.messages):
        parts = []
        for j, part in enumerate(msg.content):
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append(ContentPart(Modality.TEXT, text=part.text))
                continue
            if kind is None:
                raise InvalidInput(
                    f"message {i} part {j} has no content type (or one this gateway does not know); "
                    "set text, image, audio or video"
                )
            modality = Modality(kind)
            source = getattr(part, kind)
            which = source.WhichOneof("source")
            if which == "url":
                ref = MediaRef(modality, url=source.url)
            elif which == "inline":
                if not source.inline.data:
                    raise InvalidInput(f"message {i} part {j}: inline {kind} has no data")
                ref = MediaRef(modality, data=source.inline.data)
            elif which == "path":
                ref = MediaRef(modality, path=source.path)
            else:
                raise InvalidInput(f"message {i} part {j}: {kind} has no source; set url, inline or path")
            content = ContentPart(modality)
            parts.append(content)
            media.append((content, ref))
        messages.append(Message(role=msg.role, content=parts))

    p = message.parameters
    max_new_tokens = p.max_new_tokens or default_max_new_tokens
    params = GenerationParams(
        max_new_tokens=max_new_tokens,
        # ignore_eos: the end-of-sequence token is suppressed until the last token (transformers'
        # min_new_tokens processor), so the answer has exactly max_new_tokens tokens.
        min_new_tokens=max_new_tokens if p.ignore_eos else p.min_new_tokens,
        do_sample=p.do_sample,
        temperature=p.temperature if p.HasField("temperature") else None,
        top_p=p.top_p if p.HasField("top_p") else None,
        top_k=p.top_k if p.HasField("top_k") else None,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else None,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop),
    )
    load_audio = message.HasField("video") and message.video.load_audio_from_video
    request = GenerationRequest(
        messages=messages,
        params=params,
        mode=mode,
        return_full_text=message.return_full_text,
        video_fps=fps,
        use_audio_in_video=load_audio and any(ref.modality is Modality.VIDEO for _, ref in media),
        speaker=message.speaker or None,
    )
    if limits is not None:
        check_request(request, limits, max_new_tokens_limit)
    return IncomingRequest(request=request, media=media, load_audio_from_video=load_audio, video_fps=fps)


# ---- to the worker ---------------------------------------------------------------------------


def worker_stream(request: GenerationRequest, chunk_bytes: int) -> Iterator[wk.GenerateRequest]:
    """The worker's Generate request stream: the spec, then every media item's bytes in chunks."""
    blobs: list[tuple[int, memoryview]] = []

    def add(data: np.ndarray) -> int:
        media_id = len(blobs)
        blobs.append((media_id, np.ascontiguousarray(data).data.cast("B")))
        return media_id

    def audio_ref(audio: Audio) -> wk.AudioRef:
        samples = np.asarray(audio.samples, dtype="<f4")
        return wk.AudioRef(media_id=add(samples), sample_rate=audio.sample_rate, num_samples=len(samples))

    messages = []
    for message in request.messages:
        parts = []
        for part in message.content:
            if part.type is Modality.TEXT:
                parts.append(wk.ContentPart(text=part.text or ""))
            elif part.type is Modality.IMAGE:
                assert part.image is not None, "an IMAGE part carries its image"
                pixels = part.image.pixels
                parts.append(
                    wk.ContentPart(
                        image=wk.ImageRef(media_id=add(pixels), width=pixels.shape[1], height=pixels.shape[0])
                    )
                )
            elif part.type is Modality.AUDIO:
                assert part.audio is not None, "an AUDIO part carries its audio"
                parts.append(wk.ContentPart(audio=audio_ref(part.audio)))
            elif part.type is Modality.VIDEO:
                v = part.video
                assert v is not None, "a VIDEO part carries its video"
                ref = wk.VideoRef(
                    media_id=add(v.frames),
                    num_frames=v.frames.shape[0],
                    width=v.frames.shape[2],
                    height=v.frames.shape[1],
                    timestamps=v.timestamps_s,
                    sampled_fps=v.sampled_fps,
                    source_fps=v.source_fps,
                    duration_s=v.duration_s,
                    source_num_frames=v.source_num_frames,
                )
                if v.audio is not None and request.use_audio_in_video:
                    ref.audio.CopyFrom(audio_ref(v.audio))
                parts.append(wk.ContentPart(video=ref))
        messages.append(wk.Message(role=message.role, content=parts))

    p = request.params
    params = wk.GenerationParameters(
        max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens, do_sample=p.do_sample, stop=p.stop
    )
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(p, name)
        if value is not None:
            setattr(params, name, value)
    yield wk.GenerateRequest(
        spec=wk.GenerateSpec(
            request_id=request.request_id,
            messages=messages,
            parameters=params,
            generation_mode=WORKER_MODES.to_proto(request.mode),
            return_full_text=request.return_full_text,
            use_audio_in_video=request.use_audio_in_video,
            speaker=request.speaker or "",
        )
    )
    for media_id, view in blobs:
        for start in range(0, len(view), chunk_bytes):
            yield wk.GenerateRequest(
                media_chunk=wk.MediaChunk(media_id=media_id, data=bytes(view[start : start + chunk_bytes]))
            )


# ---- from the worker -------------------------------------------------------------------------


def model_info_from_worker(message: wk.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_id=message.model_id,
        architecture=message.architecture,
        input_modalities=[WORKER_MODALITIES[m] for m in message.input_modalities if m in WORKER_MODALITIES],
        output_modalities=[WORKER_MODALITIES[m] for m in message.output_modalities if m in WORKER_MODALITIES],
        input_audio_sample_rate=message.input_audio_sample_rate,
        output_audio_sample_rate=message.output_audio_sample_rate,
        speakers=list(message.speakers),
        device=message.device,
        max_new_tokens=message.max_new_tokens,
        max_request_media_bytes=message.max_request_media_bytes,
        max_image_pixels=message.max_image_pixels,
        max_video_frame_pixels=message.max_video_frame_pixels,
        attention=message.attention,
        decode_runner=message.decode_runner,
    )


def public_event(message: wk.GenerateResponse, timings: gw.Timings, model_id: str) -> gw.GenerateResponse:
    """A worker event as a public event; the summary gets the gateway's timings and the model id."""
    kind = message.WhichOneof("event")
    if kind == "text":
        return gw.GenerateResponse(text=gw.TextDelta(text=message.text.text))
    if kind == "audio":
        a = message.audio
        return gw.GenerateResponse(
            audio=gw.AudioChunk(
                pcm=a.pcm_s16le,
                sample_rate=a.sample_rate,
                channels=1,
                encoding=gw.AUDIO_ENCODING_PCM_S16LE,
                sequence=a.sequence,
            )
        )
    if kind == "image":
        i = message.image
        return gw.GenerateResponse(
            image=gw.GeneratedImage(data=i.data, mime_type=i.mime_type, width=i.width, height=i.height)
        )
    if kind == "summary":
        s = message.summary
        timings.queue_s = s.queue_s
        timings.time_to_first_output_s = s.time_to_first_output_s
        timings.generate_s = s.generate_s
        return gw.GenerateResponse(
            summary=gw.Summary(
                finish_reason=_public_finish_reason(s.finish_reason),
                prompt_tokens=s.prompt_tokens,
                output_tokens=s.output_tokens,
                timings=timings,
                audio_seconds=s.audio_seconds,
                model_id=model_id,
            )
        )
    raise ValueError(f"worker sent an empty event ({kind})")


def model_info_to_public(info: ModelInfo, limits: gw.Limits) -> gw.GetModelInfoResponse:
    return gw.GetModelInfoResponse(
        model_id=info.model_id,
        architecture=info.architecture,
        input_modalities=[PUBLIC_MODALITIES.to_proto(m) for m in info.input_modalities],
        output_modalities=[PUBLIC_MODALITIES.to_proto(m) for m in info.output_modalities],
        input_audio_sample_rate=info.input_audio_sample_rate,
        output_audio_sample_rate=info.output_audio_sample_rate,
        speakers=info.speakers,
        limits=limits,
    )


def _public_finish_reason(number: wk.FinishReason) -> gw.FinishReason:
    """A worker's finish reason in the public enum (UNSPECIFIED for one this gateway does not know)."""
    reason = WORKER_FINISH_REASONS.get(number)
    return PUBLIC_FINISH_REASONS.to_proto(reason) if reason is not None else PUBLIC_FINISH_REASONS.unspecified
