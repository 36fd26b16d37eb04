"""Running a generation for one HTTP request: stopped when the client hangs up, answered whole or as
server-sent events.

A streamed answer awaits the first event before the status line, so that errors before any output (bad
media, no worker, auth, limits) get their HTTP status; a later error can only be an SSE error event. Events
are ``data: <json>`` lines separated by a blank line, the last one ``data: [DONE]``, with a comment ping every
15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar, cast

from fastapi import Request
from sse_starlette import EventSourceResponse

from omnigate import tracing
from omnigate.errors import OmnigateError
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway.openai_api.errors import ClientGone, http_error
from omnigate_gateway.openai_api.responses import ChatStream, CompletionStream, TranscriptionStream

log = logging.getLogger(__name__)

T = TypeVar("T")


async def collect(events: AsyncIterator[gw.GenerateResponse]) -> list[gw.GenerateResponse]:
    return [event async for event in events]


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> tuple[T, contextvars.Context]:
    """Awaits ``awaitable`` unless the client hangs up first (then it is cancelled: generation stops).

    Returns its result and the context it ran in: the core binds the request's id and trace span there,
    and a stream that goes on in another task (the SSE response's) carries them on from it."""
    context = contextvars.copy_context()
    task = asyncio.get_running_loop().create_task(_awaited(awaitable), context=context)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone()
    return task.result(), context


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def event_stream(
    request: Request,
    events: AsyncIterator[gw.GenerateResponse],
    stream: ChatStream | CompletionStream | TranscriptionStream,
) -> EventSourceResponse:
    """A streamed answer. The first event is awaited before answering, so that errors before any output
    (bad media, no worker, auth, limits) get their HTTP status; later errors can only be an SSE error
    event."""
    iterator = aiter(events)
    first, context = await until_disconnect(request, anext(iterator, None))
    trace_context = context.run(tracing.current_context)
    return EventSourceResponse(
        _sse(stream, first, iterator, request.state.request_id, trace_context),
        sep="\n",
        ping=15,
        send_timeout=60,
    )


async def _sse(
    stream: ChatStream | CompletionStream | TranscriptionStream,
    first: gw.GenerateResponse | None,
    events: AsyncIterator[gw.GenerateResponse],
    request_id: str,
    trace_context: tracing.otel_context.Context,
) -> AsyncIterator[dict]:
    def data(chunk: dict) -> dict:
        return {"data": json.dumps(chunk, separators=(",", ":"))}

    # The SSE response iterates in a task of its own: the request's id and span are bound again here, so
    # the core's log lines (its access line at the end) carry them.
    with tracing.activate(request_id=request_id, context=trace_context):
        try:
            start = stream.start()
            for chunk in start if isinstance(start, list) else [start]:
                yield data(chunk)
            if first is not None:
                for chunk in stream.event(first):
                    yield data(chunk)
            try:
                async for event in events:
                    for chunk in stream.event(event):
                        yield data(chunk)
            except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes in the stream
                error = http_error(exc)
                if error.status >= 500 and not isinstance(exc, OmnigateError):
                    log.error("internal error in a streamed completion %s", request_id, exc_info=exc)
                yield data(error.body)
            yield {"data": "[DONE]"}
        finally:
            # The core's events are an async generator (``GatewayCore.generate``): closing it ends the call.
            await cast(AsyncGenerator[gw.GenerateResponse, None], events).aclose()
