"""What the routes take from the app and the request: the core and the settings (``app.state``, set by
``app.create_app``), the served model a request names, and the request's ``Call`` for the core.

A ``Call`` carries the credential (``Authorization: Bearer <key>`` or ``x-api-key``), the headers as call
metadata (trace context and the like; never the credential, cookies or the body's framing) and the deadline:
the ``X-Request-Timeout`` header (seconds); without it, a non-streamed request takes the openai SDK's own
timeout (``X-Stainless-Read-Timeout``, which for a non-streamed call bounds the whole answer), else the
gateway's default. A timeout that is not a finite positive number is refused (400); one above the gateway's
default timeout is cut to it (the default is also the longest wait an HTTP caller can ask for).
"""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import Headers

from omnigate.conversation import ModelInfo
from omnigate.errors import quote
from omnigate_gateway.auth import credential
from omnigate_gateway.core import Call, GatewayCore
from omnigate_gateway.openai_api.errors import InvalidParam, NotFound
from omnigate_gateway.openai_api.requests import model_matches
from omnigate_gateway.settings import GatewaySettings

TIMEOUT_HEADER = "x-request-timeout"
SDK_TIMEOUT_HEADER = "x-stainless-read-timeout"  # what the openai SDK sends: its read timeout, in seconds
# Headers that are not call metadata (the credential travels as Call.api_key).
_NOT_METADATA = {"authorization", "x-api-key", "cookie", "content-length", "content-type", "host"}


async def _core(request: Request) -> GatewayCore:
    core: GatewayCore = request.app.state.core
    return core


async def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


Core = Annotated[GatewayCore, Depends(_core)]
Settings = Annotated[GatewaySettings, Depends(_settings)]


def call_for(request: Request, settings: GatewaySettings, rpc: str, *, streamed: bool) -> Call:
    """The request as the core's ``Call``; from here on, the core logs the request's access line."""
    headers = request.headers
    call = Call(
        rpc=rpc,
        request_id=request.state.request_id,
        time_remaining_s=_timeout(headers, streamed, settings.default_timeout_s),
        api_key=credential(headers.get("authorization"), headers.get("x-api-key")),
        metadata={k: v for k, v in headers.items() if k not in _NOT_METADATA},
        protocol="http",
    )
    request.state.reached_core = True  # from here on, the core logs the request's access line
    return call


def served_model(core: GatewayCore, requested: str | None, param: str = "model") -> ModelInfo | None:
    """The worker's model info (None while no worker is ready: the core then answers 503); NotFound when
    the request names another model."""
    info = core.worker.info
    if info is not None and not model_matches(requested, info.model_id):
        raise NotFound(
            f"The model {quote(requested)} does not exist or you do not have access to it; GET /v1/models "
            "lists the model this gateway serves",
            param=param,
        )
    return info


def _timeout(headers: Headers, streamed: bool, maximum_s: float) -> float | None:
    """The caller's deadline in seconds (None: the gateway's default), at most ``maximum_s``."""
    raw = headers.get(TIMEOUT_HEADER)
    name = "X-Request-Timeout"
    if raw is None and not streamed:
        raw, name = headers.get(SDK_TIMEOUT_HEADER), "X-Stainless-Read-Timeout"
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidParam(
            f"{name} is {quote(raw)}; it must be a number of seconds greater than 0 (at most {maximum_s:g} "
            "is used)",
            name,
        )
    # A huge value (1e308) would overflow the deadline arithmetic into an immediate timeout.
    return min(value, maximum_s)
