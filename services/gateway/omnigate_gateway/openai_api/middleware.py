"""The HTTP API's outermost ASGI layer: request ids, the declared body size, and the access line of a
request refused before the core."""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnigate_gateway.core import request_id_from
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.openai_api.errors import body_too_large
from omnigate_gateway.openai_api.refusals import count_refusal, log_refusal


class RequestIdMiddleware:
    """Outermost ASGI layer: gives each request its id (the client's X-Request-ID when sane) and returns it
    on every response, errors included; refuses a declared Content-Length over the body limit with an
    OpenAI-shaped 413 before anything is read (a body without one is counted as it arrives, by FastAPI's
    ``max_body_size``); writes the access line of every request refused before it reached the core (the
    core writes the others); and keeps an exception that was already answered (Starlette re-raises it after
    the 500) from closing the client's keep-alive connection."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: GatewayMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        sent_id = None
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                sent_id = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
        state = scope.setdefault("state", {})
        # One rule for every front door; the HTTP protocol guard may have named the request already.
        request_id: str = state.get("request_id") or request_id_from(sent_id)
        state["request_id"] = request_id
        status = 0
        complete = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            if declared is not None and declared > self.max_body_bytes:
                count_refusal(self.metrics, scope.get("path", ""), "RESOURCE_EXHAUSTED")
                body = body_too_large(self.max_body_bytes)
                state["refusal"] = body["error"]
                await JSONResponse(body, status_code=413)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            if not complete:
                raise
            # Answered already (the handler logged it): uvicorn would log it again and drop the connection.
        finally:
            if status >= 400 and not state.get("reached_core") and not state.get("logged"):
                path = scope.get("path", "")
                if not (path.startswith("/health") and status == 503):  # a probe's answer, not a refusal
                    log_refusal(
                        request_id,
                        scope["method"],
                        path,
                        status,
                        state.get("refusal"),
                        time.monotonic() - started,
                    )
