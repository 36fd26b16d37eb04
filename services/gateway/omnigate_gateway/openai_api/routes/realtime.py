"""``/v1/realtime``: the OpenAI Realtime API over a WebSocket, one ``realtime.RealtimeSession`` per connection.

The handshake is authenticated like every other route (``Authorization: Bearer <key>`` or ``x-api-key``; a
browser's ``openai-insecure-api-key.<key>`` subprotocol too) and may name the model (``?model=``, as the
openai SDK's ``client.realtime.connect(model=...)`` does). A refused handshake is answered with OpenAI's
error body and HTTP status (401, 404, 503) instead of an upgrade; a plain HTTP request gets 426.

Once open, two tasks run until either ends: one reads client events (``realtime_events.client_event``) into
the session, answering a message it cannot read with an ``error`` event (the connection stays open); the
other sends the session's events as OpenAI's (``realtime_events.server_events``). A client that goes away
ends both, and closing the session cancels its running answer and so the worker call. A session idle past
``realtime_idle_timeout_s`` gets an ``error`` and a normal close (1000).
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from omnigate.conversation import ModelInfo
from omnigate.errors import OmnigateError, Unavailable
from omnigate_gateway.auth import credential
from omnigate_gateway.core import Call, GatewayCore, request_id_from
from omnigate_gateway.openai_api.dependencies import served_model
from omnigate_gateway.openai_api.errors import error_body, http_error, refusal
from omnigate_gateway.openai_api.realtime_events import WireError, client_event, server_events
from omnigate_gateway.realtime.events import SessionClosed
from omnigate_gateway.realtime.session import RealtimeSession

log = logging.getLogger(__name__)

router = APIRouter()

SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."  # a browser cannot set headers on a WebSocket
# Headers that are not call metadata (the credential travels as Call.api_key).
_NOT_METADATA = {
    "authorization",
    "x-api-key",
    "cookie",
    "host",
    "sec-websocket-key",
    "sec-websocket-protocol",
}


@router.api_route("/v1/realtime", methods=["GET", "HEAD"], response_model=None)
async def not_a_websocket(request: Request) -> JSONResponse:
    """A plain HTTP request to the WebSocket's path: 426 saying how to connect."""
    body = error_body(
        "/v1/realtime is a WebSocket: connect with an upgrade (ws:// or wss://), e.g. the openai SDK's "
        "client.realtime.connect(model=...)",
        "invalid_request_error",
        "upgrade_required",
    )
    return refusal(request, body, 426, {"Upgrade": "websocket"})


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    core: GatewayCore = websocket.app.state.core
    offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    call = _call(websocket, offered)
    try:
        core.auth.authenticate(call)
        info = served_model(core, websocket.query_params.get("model"))
        if info is None:
            raise Unavailable("no worker is ready to serve the model; try again shortly")
    except OmnigateError as exc:
        error = http_error(exc)
        log.info("realtime connection %s refused: %s", call.request_id, error.body["error"]["message"])
        await websocket.send_denial_response(JSONResponse(error.body, error.status, error.headers))
        return
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    await _converse(websocket, core, call, info)


def _call(websocket: WebSocket, offered: list[str]) -> Call:
    headers = websocket.headers
    api_key = credential(headers.get("authorization"), headers.get("x-api-key"))
    if api_key is None:
        api_key = next(
            (p.removeprefix(KEY_SUBPROTOCOL) for p in offered if p.startswith(KEY_SUBPROTOCOL)), None
        )
    return Call(
        rpc="Generate",
        request_id=request_id_from(headers.get("x-request-id")),
        api_key=api_key,
        metadata={k: v for k, v in headers.items() if k not in _NOT_METADATA},
        protocol="http",
    )


async def _converse(websocket: WebSocket, core: GatewayCore, call: Call, info: ModelInfo) -> None:
    async with RealtimeSession(core, call, info) as session:
        log.info("realtime session %s opened (connection %s)", session.id, call.request_id)
        reader = asyncio.create_task(_read(websocket, session, info.model_id), name=f"{session.id}-read")
        writer = asyncio.create_task(_write(websocket, session), name=f"{session.id}-write")
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            for outcome in await asyncio.gather(reader, writer, return_exceptions=True):
                # The client left: a disconnect, or a send on a connection that is gone (OSError).
                if isinstance(outcome, Exception) and not isinstance(outcome, WebSocketDisconnect | OSError):
                    log.error("realtime session %s failed", session.id, exc_info=outcome)
    log.info("realtime session %s closed", session.id)


async def _read(websocket: WebSocket, session: RealtimeSession, model_id: str) -> None:
    """Client messages into the session, until the client goes away."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        try:
            event = client_event(data, model_id)
        except WireError as error:
            await session.error(error.message, error.code, error.param, error.event_id)
            continue
        await session.send(event)


async def _write(websocket: WebSocket, session: RealtimeSession) -> None:
    """The session's events to the client, until the session ends."""
    async for event in session.events():
        if isinstance(event, SessionClosed):
            await websocket.close(1000, f"session closed: {event.reason}")
            return
        for message in server_events(event, session.id):
            await websocket.send_text(json.dumps(message))
