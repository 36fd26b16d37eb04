"""Python client for Omnigate's public gRPC API.

    from omnigate_client import OmnigateClient

    client = OmnigateClient("127.0.0.1:50051")
    messages = [{"role": "user", "content": [
        {"type": "audio", "url": "http://127.0.0.1:8088/sound.wav"},
        {"type": "text", "text": "What do you hear in this audio?"},
    ]}]
    for event in client.generate(messages, max_new_tokens=20):
        if isinstance(event, TextDelta):
            print(event.text, end="", flush=True)

Messages use Hugging Face's chat shape. A media part gives its source as ``url`` (http, https, data:), as
``path`` (a local file: read here and sent inline), or as raw ``data`` bytes.
"""

from __future__ import annotations

import io
import pathlib
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc

MODES = {
    "text": pb.GENERATION_MODE_TEXT,
    "audio": pb.GENERATION_MODE_AUDIO,
    "image": pb.GENERATION_MODE_IMAGE,
}
MODALITY_NAMES = {
    pb.MODALITY_TEXT: "text",
    pb.MODALITY_IMAGE: "image",
    pb.MODALITY_AUDIO: "audio",
    pb.MODALITY_VIDEO: "video",
}
FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}
REMOTE_SCHEMES = ("http://", "https://", "data:")


@dataclass
class TextDelta:
    text: str


@dataclass
class AudioChunk:
    pcm_s16le: bytes
    sample_rate: int
    channels: int
    sequence: int


@dataclass
class Image:
    data: bytes
    mime_type: str
    width: int
    height: int


@dataclass
class Summary:
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    audio_seconds: float
    model_id: str
    timings: dict[str, float]


@dataclass
class Result:
    """Everything a Generate stream returned, collected."""

    text: str = ""
    audio: list[AudioChunk] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    summary: Summary | None = None

    def wav_bytes(self) -> bytes:
        """The speech as a WAV file."""
        if not self.audio:
            raise ValueError("the response has no audio")
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as out:
            out.setnchannels(self.audio[0].channels)
            out.setsampwidth(2)
            out.setframerate(self.audio[0].sample_rate)
            for chunk in sorted(self.audio, key=lambda c: c.sequence):
                out.writeframes(chunk.pcm_s16le)
        return buffer.getvalue()


class OmnigateClient:
    """A blocking client; one channel per instance (use as a context manager or call ``close()``)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout_s: float | None = 600.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> OmnigateClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def health(self, timeout_s: float = 5.0) -> str:
        """The gateway's health status name ("SERVING", "NOT_SERVING", ...)."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def model_info(self, timeout_s: float = 10.0) -> dict:
        info = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s)
        limits = info.limits
        return {
            "model_id": info.model_id,
            "architecture": info.architecture,
            "input_modalities": [MODALITY_NAMES.get(m, str(m)) for m in info.input_modalities],
            "output_modalities": [MODALITY_NAMES.get(m, str(m)) for m in info.output_modalities],
            "input_audio_sample_rate": info.input_audio_sample_rate,
            "output_audio_sample_rate": info.output_audio_sample_rate,
            "speakers": list(info.speakers),
            "limits": {f.name: getattr(limits, f.name) for f in limits.DESCRIPTOR.fields},
        }

    def generate(
        self,
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
        timeout_s: float | None = None,
    ) -> Iterator[TextDelta | AudioChunk | Image | Summary]:
        """Streams the response events. Raises ``grpc.RpcError`` with the server's status on failure."""
        if generation_mode not in MODES:
            raise ValueError(f"generation_mode must be one of {', '.join(MODES)}; got {generation_mode!r}")
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
        request = pb.GenerateRequest(
            messages=[_message(m) for m in messages],
            parameters=params,
            generation_mode=MODES[generation_mode],
            return_full_text=return_full_text,
            video=pb.VideoOptions(fps=fps or 0.0, load_audio_from_video=load_audio_from_video),
            speaker=speaker or "",
        )
        stream = self._stub.Generate(request, timeout=timeout_s if timeout_s is not None else self.timeout_s)
        for event in stream:
            yield _event(event)

    def generate_all(self, messages: list[dict], **kwargs) -> Result:
        """Runs ``generate`` to the end and collects the result."""
        result = Result()
        for event in self.generate(messages, **kwargs):
            if isinstance(event, TextDelta):
                result.text += event.text
            elif isinstance(event, AudioChunk):
                result.audio.append(event)
            elif isinstance(event, Image):
                result.images.append(event)
            else:
                result.summary = event
        return result


def media_part(kind: str, source: str | bytes | pathlib.Path) -> dict:
    """A content part for a URL, a local path (read by the client) or raw bytes."""
    if isinstance(source, bytes):
        return {"type": kind, "data": source}
    if isinstance(source, str) and source.startswith(REMOTE_SCHEMES):
        return {"type": kind, "url": source}
    return {"type": kind, "path": str(source)}


def _message(message: dict) -> pb.Message:
    content = message.get("content", [])
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return pb.Message(role=message.get("role", "user"), content=[_part(p) for p in content])


def _part(part: dict) -> pb.ContentPart:
    kind = part.get("type")
    if kind == "text":
        return pb.ContentPart(text=part.get("text", ""))
    if kind not in ("image", "audio", "video"):
        raise ValueError(f"unknown content part type {kind!r}; use text, image, audio or video")
    if "url" in part or (isinstance(part.get(kind), str) and part[kind].startswith(REMOTE_SCHEMES)):
        source = pb.MediaSource(url=part.get("url") or part[kind])
    elif "path" in part or isinstance(part.get(kind), str):
        path = pathlib.Path(part.get("path") or part[kind])
        source = pb.MediaSource(inline=pb.InlineMedia(data=path.read_bytes()))  # read here, sent inline
    elif "data" in part or isinstance(part.get(kind), bytes):
        source = pb.MediaSource(
            inline=pb.InlineMedia(data=part.get("data") or part[kind], mime_type=part.get("mime_type", ""))
        )
    else:
        raise ValueError(f"{kind} part needs a url, path or data")
    return pb.ContentPart(**{kind: source})


def _event(event: pb.GenerateResponse):
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
    return Summary(
        finish_reason=FINISH_REASONS.get(s.finish_reason, "unspecified"),
        prompt_tokens=s.prompt_tokens,
        output_tokens=s.output_tokens,
        audio_seconds=s.audio_seconds,
        model_id=s.model_id,
        timings={f.name: getattr(s.timings, f.name) for f in s.timings.DESCRIPTOR.fields},
    )
