"""Between the SDK's Python shapes and the gateway's protobuf messages (shared by the sync and async clients).

Messages use Hugging Face's chat shape: ``{"role": "user", "content": [parts]}`` or string content. A media
part gives its source as ``url`` (http, https, data:), as ``path`` (a local file: read here and sent
inline), or as raw ``data`` bytes; ``{"type": "image", "image": "https://..."}`` works too.
"""

from __future__ import annotations

import pathlib
from enum import StrEnum
from typing import Any

from omnigate.conversation import GenerationMode
from omnigate.enums import PUBLIC_FINISH_REASONS, PUBLIC_MODALITIES, PUBLIC_MODES
from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate_client.types import AudioChunk, Event, Image, ModelInfo, Summary, TextDelta, Timings

MODES = {mode.value: PUBLIC_MODES.to_proto(mode) for mode in GenerationMode}


def _name(member: StrEnum | None, unknown: str) -> str:
    """A proto enum value as the SDK's string: the member's name ("audio", "stop"), or ``unknown`` for a
    value a newer gateway may send that this SDK does not know."""
    return member.value if member is not None else unknown


REMOTE_SCHEMES = ("http://", "https://", "data:")
MEDIA_KINDS = ("image", "audio", "video")


def media_part(kind: str, source: str | bytes | pathlib.Path) -> dict:
    """A content part for a URL, a local path (read by the client) or raw bytes."""
    if kind not in MEDIA_KINDS:
        raise ValueError(f"unknown media kind {kind!r}; use image, audio or video")
    if isinstance(source, bytes):
        return {"type": kind, "data": source}
    if isinstance(source, str) and source.startswith(REMOTE_SCHEMES):
        return {"type": kind, "url": source}
    return {"type": kind, "path": str(source)}


def build_request(
    messages: list[dict],
    *,
    generation_mode: str = "text",
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    return_full_text: bool = False,
    fps: float | None = None,
    load_audio_from_video: bool = False,
    speaker: str | None = None,
) -> pb.GenerateRequest:
    """The ``GenerateRequest`` for these arguments (local files are read here; ValueError/OSError on bad
    input that can be caught before sending)."""
    if generation_mode not in MODES:
        raise ValueError(f"generation_mode must be one of {', '.join(MODES)}; got {generation_mode!r}")
    if isinstance(stop, str):
        stop = [stop]
    params = pb.GenerationParameters(
        max_new_tokens=max_new_tokens or 0,
        min_new_tokens=min_new_tokens or 0,
        do_sample=do_sample,
        stop=stop or [],
    )
    for name, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("repetition_penalty", repetition_penalty),
        ("seed", seed),
    ):
        if value is not None:
            setattr(params, name, value)
    return pb.GenerateRequest(
        messages=[_message(m) for m in messages],
        parameters=params,
        generation_mode=MODES[generation_mode],
        return_full_text=return_full_text,
        video=pb.VideoOptions(fps=fps or 0.0, load_audio_from_video=load_audio_from_video),
        speaker=speaker or "",
    )


def _message(message: dict) -> pb.Message:
    if not isinstance(message, dict):
        raise ValueError(f"a message is a dict with 'role' and 'content'; got {type(message).__name__}")
    content = message.get("content", [])
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return pb.Message(role=message.get("role", "user"), content=[_part(p) for p in content])


def _part(part: dict) -> pb.ContentPart:
    if isinstance(part, str):
        return pb.ContentPart(text=part)
    kind = part.get("type")
    if kind == "text":
        return pb.ContentPart(text=part.get("text", ""))
    if kind not in MEDIA_KINDS:
        raise ValueError(f"unknown content part type {kind!r}; use text, image, audio or video")
    inline: Any = part.get(kind)  # a URL or path (str, Path), bytes, or missing: checked below
    if "url" in part or (isinstance(inline, str) and inline.startswith(REMOTE_SCHEMES)):
        source = pb.MediaSource(url=part.get("url") or inline)
    elif "path" in part or isinstance(inline, (str, pathlib.Path)):
        path = pathlib.Path(part.get("path") or inline)
        source = pb.MediaSource(inline=pb.InlineMedia(data=path.read_bytes()))  # read here, sent inline
    elif "data" in part or isinstance(inline, bytes):
        source = pb.MediaSource(
            inline=pb.InlineMedia(data=part.get("data") or inline, mime_type=part.get("mime_type", ""))
        )
    else:
        raise ValueError(f"{kind} part needs a url, path or data")
    content = pb.ContentPart()
    getattr(content, kind).CopyFrom(source)  # the oneof's image, audio or video field
    return content


def event_from_proto(event: pb.GenerateResponse) -> Event:
    kind = event.WhichOneof("event")
    if kind == "text":
        return TextDelta(event.text.text)
    if kind == "audio":
        a = event.audio
        return AudioChunk(a.pcm, a.sample_rate, a.channels or 1, a.sequence)
    if kind == "image":
        i = event.image
        return Image(i.data, i.mime_type, i.width, i.height)
    s = event.summary
    t = s.timings
    return Summary(
        finish_reason=_name(PUBLIC_FINISH_REASONS.get(s.finish_reason), "unspecified"),
        prompt_tokens=s.prompt_tokens,
        output_tokens=s.output_tokens,
        audio_seconds=s.audio_seconds,
        model_id=s.model_id,
        timings=Timings(
            media_s=t.media_s,
            queue_s=t.queue_s,
            time_to_first_output_s=t.time_to_first_output_s,
            generate_s=t.generate_s,
            total_s=t.total_s,
        ),
    )


def model_info_from_proto(info: pb.GetModelInfoResponse) -> ModelInfo:
    limits = info.limits
    return ModelInfo(
        model_id=info.model_id,
        architecture=info.architecture,
        input_modalities=[_name(PUBLIC_MODALITIES.get(m), str(m)) for m in info.input_modalities],
        output_modalities=[_name(PUBLIC_MODALITIES.get(m), str(m)) for m in info.output_modalities],
        input_audio_sample_rate=info.input_audio_sample_rate,
        output_audio_sample_rate=info.output_audio_sample_rate,
        speakers=list(info.speakers),
        limits={f.name: getattr(limits, f.name) for f in limits.DESCRIPTOR.fields},
    )
