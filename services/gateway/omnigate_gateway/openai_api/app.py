"""The gateway's OpenAI-compatible HTTP API as an ASGI app (FastAPI, served by ``server.HttpApiServer`` on
the gateway's event loop).

A second front door onto ``GatewayCore``, next to gRPC: each request becomes a public ``GenerateRequest``
(``requests``) plus a ``Call`` (``dependencies``), and the core's events go back as OpenAI JSON or
server-sent events (``responses``, ``streaming``). Routes (``routes/``):

- ``POST /v1/chat/completions`` (streamed as SSE with ``stream: true``), text or speech output;
- ``POST /v1/completions``: text prompts (one user message on the same core; see ``requests``);
- ``POST /v1/images/generations`` for image-output models;
- ``POST /v1/audio/speech`` (speech as it is generated: wav, pcm, mp3, opus, aac, flac) and
  ``POST /v1/audio/transcriptions`` (a multipart audio file to text, for audio-input models);
- ``GET /v1/models``, ``GET /v1/models/{id}``;
- ``GET /health``, ``/health/readiness``, ``/health/liveness``: the gateway's gRPC health services
  (``omnigate_gateway.health``), 200 while SERVING, 503 otherwise;
- ``/v1/realtime`` (WebSocket): OpenAI's Realtime API, a spoken conversation (``routes/realtime.py``).

Every GET route answers HEAD (same status and headers, no body); a method a route does not take is 405
with an ``Allow`` header. Every error is answered in OpenAI's shape (``errors``).

Credentials: ``Authorization: Bearer <key>`` (or ``x-api-key``) becomes ``Call.api_key``. With the gateway's
TLS certificate configured the API is HTTPS only (``server``). Deadline: the ``X-Request-Timeout`` header
(seconds), else the openai SDK's ``X-Stainless-Read-Timeout`` for a non-streamed request, else the gateway's
default (``dependencies``). Every response carries ``X-Request-ID`` (the client's, when it sent a sane one).

Access lines: a request that reaches the core gets the core's access line (``observation._log_access``);
a request refused before it (bad JSON or parameters, unknown route or method, body too large, a malformed
HTTP request) gets one from ``RequestIdMiddleware`` (or the HTTP protocol guard), on the same logger, with
the request id, the HTTP status and the reason (``refusals``). uvicorn's own access log is off: it would log
every URL with its query string (where a client may put a credential).
"""

from __future__ import annotations

import time

from fastapi import FastAPI

from omnigate.validation import RequestLimits
from omnigate_gateway.core import GatewayCore
from omnigate_gateway.openai_api.errors import EXCEPTION_HANDLERS
from omnigate_gateway.openai_api.middleware import RequestIdMiddleware
from omnigate_gateway.openai_api.routes import audio, completions, health, images, models, realtime
from omnigate_gateway.openai_api.routes.health import HealthProbe
from omnigate_gateway.settings import GatewaySettings


def create_app(core: GatewayCore, settings: GatewaySettings, probe: HealthProbe) -> RequestIdMiddleware:
    """The ASGI application: FastAPI routes wrapped in the X-Request-ID middleware."""
    app = FastAPI(
        title="Omnigate OpenAI-compatible API",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        max_body_size=settings.max_http_body_bytes,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    # What the routes and the exception handlers read (``dependencies``).
    app.state.core = core
    app.state.settings = settings
    app.state.health = probe
    app.state.started = int(time.time())  # the model object's ``created``
    limits = RequestLimits(settings.max_messages, settings.max_content_parts)
    for router in (
        health.router,
        models.router,
        completions.chat_completions_router(limits),
        completions.router,
        images.router,
        audio.router,
        realtime.router,
    ):
        app.include_router(router)
    return RequestIdMiddleware(app, settings.max_http_body_bytes, core.metrics)
