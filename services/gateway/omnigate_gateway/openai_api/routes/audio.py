"""``POST /v1/audio/speech`` (text to speech, streamed as it is generated) and
``POST /v1/audio/transcriptions`` (an uploaded audio file to text), on the same core as chat.

Speech: the body becomes a GenerateRequest in audio mode (``requests.speech_request``); the answer is the
audio file, sent with chunked transfer as the worker's chunks arrive (``encoding.SpeechEncoder``; FLAC is
sent whole at the end). The status line waits for the first chunk of speech, so errors before any audio
(bad voice, no worker, limits, a failure while the model writes its text) get their HTTP status; an error
after it can only cut the transfer short (the connection closes without the last chunk, which a client
reads as an incomplete body), and the core's access line names it.

Transcription: a multipart form (``file`` plus OpenAI's fields); the file goes to the core as inline audio,
decoded by the gateway's media path with the limits of any inline audio (``OMNIGATE_GATEWAY_MAX_AUDIO_BYTES``,
the audio duration limit; the whole body is bounded by ``OMNIGATE_GATEWAY_MAX_HTTP_BODY_BYTES``). Answered as
``{"text": ...}`` (``json``), plain text (``text``), or server-sent ``transcript.text.delta`` /
``transcript.text.done`` events with ``stream=true``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.types import Send

from omnigate import tracing
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway.openai_api.dependencies import Core, Settings, call_for, served_model
from omnigate_gateway.openai_api.encoding import SpeechEncoder
from omnigate_gateway.openai_api.errors import InvalidParam
from omnigate_gateway.openai_api.protocol import SpeechRequest
from omnigate_gateway.openai_api.requests import speech_request, transcription_fields, transcription_request
from omnigate_gateway.openai_api.responses import TranscriptionStream, transcription
from omnigate_gateway.openai_api.streaming import collect, event_stream, until_disconnect

log = logging.getLogger(__name__)

router = APIRouter()

# What a transcription form may hold: one file, OpenAI's fields (arrays count once per value).
_MAX_FORM_FILES = 1
_MAX_FORM_FIELDS = 64


@router.post("/v1/audio/speech", response_model=None)
async def create_speech(body: SpeechRequest, request: Request, core: Core, settings: Settings) -> Response:
    info = served_model(core, body.model)
    proto, response_format = speech_request(body, info)
    call = call_for(request, settings, "Generate", streamed=True)  # the SDK's read timeout bounds no stream
    encoder = SpeechEncoder(response_format, info.output_audio_sample_rate if info is not None else 0)
    events = core.generate(proto, call)
    try:
        first, context = await until_disconnect(request, _first_audio(events))
    except BaseException:
        await events.aclose()
        raise
    trace_context = context.run(tracing.current_context)
    return _SpeechResponse(
        _speech(encoder, first, events, call.request_id, trace_context),
        media_type=encoder.encoding.content_type,
    )


class _CutShort(Exception):
    """The speech failed after its first bytes (logged where it happened)."""


class _SpeechResponse(StreamingResponse):
    """A streamed speech file that a failure after the status line cuts short: the response ends without
    its last (empty) chunk and uvicorn closes the connection, so the client reads an incomplete body instead
    of a complete-looking file that is missing its end (a WAV stream has no length to tell)."""

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except _CutShort:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _first_audio(events: AsyncIterator[gw.GenerateResponse]) -> gw.GenerateResponse | None:
    """The first chunk of speech (the text the model speaks comes before it), or None when there is none."""
    async for event in events:
        if event.WhichOneof("event") == "audio":
            return event
    return None


async def _speech(
    encoder: SpeechEncoder,
    first: gw.GenerateResponse | None,
    events: AsyncGenerator[gw.GenerateResponse, None],
    request_id: str,
    trace_context: tracing.otel_context.Context,
) -> AsyncIterator[bytes]:
    """The speech file's bytes as the worker's chunks arrive; the core's events are closed when it ends
    (finished, failed, or the client left), which ends the call."""

    async def run(call: Callable[..., bytes], *args: object) -> bytes:
        return await asyncio.to_thread(call, *args) if encoder.blocking else call(*args)

    # The response iterates in a task of its own: the request's id and span are bound again here, so the
    # core's log lines (its access line at the end) carry them.
    with tracing.activate(request_id=request_id, context=trace_context):
        try:
            chunk = first
            while chunk is not None:
                if chunk.WhichOneof("event") == "audio":
                    audio = chunk.audio
                    data = await run(encoder.encode, audio.pcm, audio.sample_rate, audio.channels)
                    if data:
                        yield data
                chunk = await anext(events, None)
            tail = await run(encoder.finish)
            if tail:
                yield tail
        except Exception as exc:  # noqa: BLE001 - the status line is sent: all that is left is to cut it short
            log.warning(
                "speech %s failed after its first bytes; its answer is cut short: %r", request_id, exc
            )
            raise _CutShort() from exc
        finally:
            encoder.close()
            await events.aclose()


@router.post("/v1/audio/transcriptions", response_model=None)
async def create_transcription(request: Request, core: Core, settings: Settings) -> Response | dict:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise InvalidParam(
            "send the request as multipart/form-data, with the audio in a file field named file", None
        )
    form = await request.form(max_files=_MAX_FORM_FILES, max_fields=_MAX_FORM_FIELDS)
    try:
        upload = form.get("file")
        if upload is None:
            raise InvalidParam("file is missing; send the audio as a file field named file", "file")
        if not isinstance(upload, UploadFile):
            raise InvalidParam("file must be an uploaded file (a multipart file field), not text", "file")
        fields = [(k, v) for k, v in form.multi_items() if k != "file" and isinstance(v, str)]
        body = transcription_fields(fields)
        audio = await upload.read()
    finally:
        await form.close()
    info = served_model(core, body.model)
    proto, options = transcription_request(body, audio, info)
    call = call_for(request, settings, "Generate", streamed=options.stream)
    events = core.generate(proto, call)
    if options.stream:
        return await event_stream(request, events, TranscriptionStream())
    collected, _ = await until_disconnect(request, collect(events))
    answer = transcription(collected)
    if options.response_format == "text":
        return PlainTextResponse(answer["text"])
    return answer
