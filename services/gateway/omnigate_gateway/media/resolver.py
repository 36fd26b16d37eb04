"""Turning a media URL's host name into IP addresses.

The fetcher resolves each host exactly once, checks every address it got (``policy``), and connects
to one of those checked addresses; it never lets the HTTP library resolve the name again. The resolver is
injected so that tests can map public-looking names to chosen addresses without touching real DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Protocol

from omnigate.errors import quote
from omnigate_gateway.errors import MediaFetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """All addresses of ``host`` (an ASCII/IDNA name, never an IP literal); raises MediaFetchError."""
        ...


class SystemResolver:
    """The operating system's resolver (getaddrinfo, run off the event loop by asyncio)."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise MediaFetchError(f"could not resolve the host {quote(host)}: {reason}") from None
        addresses: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            # An IPv6 sockaddr may carry a zone ("fe80::1%eth0"); the zone is irrelevant to the check.
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise MediaFetchError(f"the host {quote(host)} has no addresses")
        return addresses


class StaticResolver:
    """Answers from a fixed table ({name: [addresses]}); other names go to ``fallback`` or fail.

    For tests: lets a public-looking name resolve to a private address (or to a local test server)
    without DNS. ``lookups`` records every name asked for.
    """

    def __init__(self, table: Mapping[str, Iterable[str] | str], *, fallback: Resolver | None = None) -> None:
        self._table = {
            name.lower(): [ipaddress.ip_address(a) for a in ([v] if isinstance(v, str) else v)]
            for name, v in table.items()
        }
        self._fallback = fallback
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        self.lookups.append(host)
        addresses = self._table.get(host.lower())
        if addresses is not None:
            return list(addresses)
        if self._fallback is not None:
            return await self._fallback.resolve(host, port)
        raise MediaFetchError(f"could not resolve the host {quote(host)}: not in the test resolver's table")
