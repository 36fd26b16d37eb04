"""Where the workers are: ``OMNIGATE_GATEWAY_WORKER_TARGET`` parsed, and its names resolved.

The setting is a comma-separated list of entries. An entry with an IP address (``10.0.0.7:50061``,
``[::1]:50061``) is one worker. An entry with a name (``dns:///name:port``, gRPC's syntax, or plain
``name:port``) is resolved with the event loop's ``getaddrinfo`` (``resolve_with_loop``) every
``worker_discovery_interval_s``: every A/AAAA record is a worker (a Kubernetes headless Service lists one per
ready pod). The pool (``pool.py``) runs that discovery.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Resolve = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class TargetEntry:
    """One entry of worker_target: an address (one worker) or a name resolved to workers."""

    host: str
    port: int
    resolve: bool  # True: a DNS name whose A/AAAA records are the workers

    def __str__(self) -> str:
        return f"dns:///{self.host}:{self.port}" if self.resolve else address(self.host, self.port)


def address(host: str, port: int) -> str:
    """``host:port`` as gRPC takes it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_worker_target(value: str) -> list[TargetEntry]:
    """Parses worker_target (``host:port``, ``dns:///name:port``, comma-separated); ValueError if malformed."""
    entries = []
    for raw in (item.strip() for item in value.split(",")):
        if not raw:
            continue
        rest = raw
        if rest.startswith("dns:"):
            rest = rest[4:]
            if rest.startswith("//"):
                authority, _, rest = rest[2:].partition("/")
                if authority:
                    raise ValueError(
                        f"worker target {raw!r}: a DNS server (dns://SERVER/...) is not supported; use "
                        "dns:///name:port"
                    )
        if rest.startswith("["):
            host, sep, port_text = rest[1:].partition("]:")
            if not sep:
                raise ValueError(f"worker target {raw!r}: expected [IPv6]:port")
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep or ":" in host:
                raise ValueError(
                    f"worker target {raw!r}: expected host:port, [IPv6]:port or dns:///name:port"
                )
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"worker target {raw!r}: expected host:port with a port from 1 to 65535")
        try:
            ipaddress.ip_address(host)
            is_ip = True
        except ValueError:
            is_ip = False
        if not is_ip and ":" in host:
            raise ValueError(f"worker target {raw!r}: {host!r} is not an IPv6 address")
        entries.append(TargetEntry(host, int(port_text), resolve=not is_ip))
    if not entries:
        raise ValueError(
            "worker_target is empty: give host:port, a comma-separated list, or dns:///name:port"
        )
    return entries


async def resolve_with_loop(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA records), in the resolver's order, no duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
