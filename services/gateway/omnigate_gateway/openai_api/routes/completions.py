"""``POST /v1/chat/completions`` (text or speech output; server-sent events with ``stream: true``) and
``POST /v1/completions`` (a text prompt, answered as one user message on the same core)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response

from omnigate.conversation import ModelInfo
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate.validation import RequestLimits
from omnigate_gateway.core import GatewayCore
from omnigate_gateway.openai_api.dependencies import Core, Settings, call_for, served_model
from omnigate_gateway.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    bounded_chat_request,
)
from omnigate_gateway.openai_api.requests import (
    ChatOptions,
    CompletionOptions,
    chat_request,
    completion_request,
    pick_voice,
)
from omnigate_gateway.openai_api.responses import (
    ChatStream,
    CompletionStream,
    chat_completion,
    text_completion,
)
from omnigate_gateway.openai_api.streaming import collect, event_stream, until_disconnect
from omnigate_gateway.settings import GatewaySettings

Options = TypeVar("Options", ChatOptions, CompletionOptions)

router = APIRouter()


async def chat_completions(
    body: ChatCompletionRequest, request: Request, core: Core, settings: Settings
) -> Response | dict:
    """``POST /v1/chat/completions``; ``chat_completions_router`` adds it with the app's bounded body."""
    info = served_model(core, body.model)
    proto, options = chat_request(body, info.max_new_tokens if info is not None else None)
    if info is not None and options.voice:
        proto.speaker = pick_voice(options.voice, info.speakers)
    return await _complete(
        request, core, settings, body.model, info, proto, options, "chatcmpl", chat_completion, ChatStream
    )


def chat_completions_router(limits: RequestLimits) -> APIRouter:
    """``POST /v1/chat/completions`` with its body validated as ``bounded_chat_request(limits)``: a request
    with more messages or content parts than the gateway takes is refused before any of them is validated.
    That model is made from the settings, so this route is added when the app is built, not at import."""

    async def endpoint(
        body: ChatCompletionRequest, request: Request, core: Core, settings: Settings
    ) -> Response | dict:
        return await chat_completions(body, request, core, settings)

    endpoint.__annotations__["body"] = bounded_chat_request(limits)  # what FastAPI validates the body as
    chat = APIRouter()
    chat.add_api_route("/v1/chat/completions", endpoint, methods=["POST"], response_model=None)
    return chat


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, core: Core, settings: Settings
) -> Response | dict:
    info = served_model(core, body.model)
    proto, options = completion_request(body, info.max_new_tokens if info is not None else None)
    return await _complete(
        request, core, settings, body.model, info, proto, options, "cmpl", text_completion, CompletionStream
    )


async def _complete(
    request: Request,
    core: GatewayCore,
    settings: GatewaySettings,
    requested_model: str | None,
    info: ModelInfo | None,
    proto: gw.GenerateRequest,
    options: Options,
    prefix: str,
    answer: Callable[[str, int, str, Options, list[gw.GenerateResponse]], dict],
    stream_class: Callable[[str, int, str, Options], ChatStream | CompletionStream],
) -> Response | dict:
    """Runs a chat or text completion through the core: one JSON answer, or server-sent events."""
    call = call_for(request, settings, "Generate", streamed=options.stream)
    model = info.model_id if info is not None else (requested_model or "")
    completion_id = f"{prefix}-{call.request_id}"
    created = int(time.time())
    events = core.generate(proto, call)
    if not options.stream:
        collected, _ = await until_disconnect(request, collect(events))
        return answer(completion_id, created, model, options, collected)
    return await event_stream(request, events, stream_class(completion_id, created, model, options))
