"""Fetching media bytes from what a request points at: http(s) URLs, data: URLs and local paths.

Every source is size-capped and time-limited, and by default only public internet destinations are
reachable: a host that is or resolves to a loopback, private, link-local, multicast, unspecified or
reserved address is refused, on the first request and on every redirect hop (redirects are followed
here, one hop at a time, never by httpx).

Known gap, left for the SSRF hardening pass: the address check and httpx's own connect resolve the host
separately, so a DNS answer that changes in between (DNS rebinding) is not caught. ``_check_destination``
is the single place to change when the connection gets pinned to the checked address.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx

from omnigate_gateway.errors import (
    ForbiddenSource,
    LimitExceeded,
    MediaFetchError,
    MediaFetchTimeout,
)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_HTTP_SCHEMES = frozenset({"http", "https"})
_USER_AGENT = "omnigate-gateway"


@dataclass(frozen=True)
class FetchLimits:
    """How far and how long the fetcher may go for one media item."""

    connect_timeout_s: float = 5.0  # time to open a connection to the media host
    read_timeout_s: float = 15.0  # longest wait for the next chunk of the body
    total_timeout_s: float = 30.0  # wall-clock limit for one item, redirects included
    max_bytes: int = 100 * 1024 * 1024  # largest body accepted for one item
    max_redirects: int = 5  # redirect hops followed before giving up
    allow_private_networks: bool = False  # allow loopback/private/link-local destinations (local dev only)
    local_files_root: str | None = None  # directory local paths may be read from; None disables paths


class MediaFetcher:
    """Fetches media bytes with the limits above. Create one per server; close it with ``aclose()``."""

    def __init__(self, limits: FetchLimits, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._limits = limits
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=limits.connect_timeout_s,
                read=limits.read_timeout_s,
                write=limits.read_timeout_s,
                pool=limits.connect_timeout_s,
            ),
            follow_redirects=False,  # followed by hand so that every hop is checked
            trust_env=False,  # no proxies or netrc picked up from the environment
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
            transport=transport,
        )

    @property
    def limits(self) -> FetchLimits:
        return self._limits

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> MediaFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def fetch(self, url: str) -> bytes:
        """Returns the bytes behind an http(s) or data: URL.

        Raises ForbiddenSource (scheme or destination not allowed), MediaFetchError (unreachable, HTTP
        error status, bad data: URL, too many redirects), LimitExceeded (over ``max_bytes``) and
        MediaFetchTimeout (over a timeout).
        """
        scheme = _scheme_of(url)
        if scheme == "data":
            return _decode_data_url(url, self._limits.max_bytes)
        if scheme not in _HTTP_SCHEMES:
            raise ForbiddenSource(_scheme_refusal(scheme))
        try:
            async with asyncio.timeout(self._limits.total_timeout_s):
                return await self._fetch_http(url)
        except TimeoutError:
            raise MediaFetchTimeout(
                f"fetching {_describe(url)} took longer than the limit of {self._limits.total_timeout_s:g} s"
            ) from None

    def read_local(self, path: str) -> bytes:
        """Returns the bytes of a file under ``local_files_root`` (symlinks resolved first).

        Raises ForbiddenSource (local files disabled, or the path leaves the root), MediaFetchError (no
        such file, not a regular file, unreadable) and LimitExceeded (over ``max_bytes``).
        """
        root_setting = self._limits.local_files_root
        if not root_setting:
            raise ForbiddenSource("reading local files is not enabled on this gateway; send a URL instead")
        root = Path(root_setting).resolve()
        try:
            candidate = (root / path).resolve()  # an absolute path replaces root; ".." and symlinks resolved
        except (OSError, ValueError):  # e.g. an embedded NUL byte, a symlink loop
            raise MediaFetchError(f"{path!r} is not a valid local path") from None
        if not candidate.is_relative_to(root):
            raise ForbiddenSource(f"local paths must be inside {root}; {path!r} is not")
        if not candidate.exists():
            raise MediaFetchError(f"no such file: {path!r}")
        if not candidate.is_file():
            raise MediaFetchError(f"{path!r} is not a regular file")
        cap = self._limits.max_bytes
        try:
            with open(candidate, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > cap:
                    raise LimitExceeded(_size_message(f"{path!r}", size, cap))
                data = f.read(cap + 1)
        except OSError as e:
            raise MediaFetchError(f"could not read {path!r}: {e.strerror or e}") from None
        if len(data) > cap:  # the file grew after the size check
            raise LimitExceeded(_size_message(f"{path!r}", len(data), cap, at_least=True))
        return data

    async def _fetch_http(self, url: str) -> bytes:
        current = url
        for hop in range(self._limits.max_redirects + 1):
            await self._check_destination(current)
            try:
                request = self._client.build_request("GET", current)
                response = await self._client.send(request, stream=True)
            except httpx.TimeoutException:
                raise MediaFetchTimeout(
                    f"fetching {_describe(current)} timed out (connect limit {self._limits.connect_timeout_s:g} s, "
                    f"read limit {self._limits.read_timeout_s:g} s)"
                ) from None
            except httpx.InvalidURL as e:
                raise MediaFetchError(f"the URL {_describe(current)} is not valid: {e}") from None
            except httpx.TransportError as e:
                raise MediaFetchError(f"could not connect to {_describe(current)}: {_reason(e)}") from None
            try:
                if response.status_code in _REDIRECT_STATUSES and "location" in response.headers:
                    if hop == self._limits.max_redirects:
                        raise MediaFetchError(
                            f"{_describe(url)} redirected more than {self._limits.max_redirects} times; "
                            f"at most {self._limits.max_redirects} redirects are followed"
                        )
                    current = urljoin(str(response.url), response.headers["location"])
                    next_scheme = _scheme_of(current)
                    if next_scheme not in _HTTP_SCHEMES:
                        raise ForbiddenSource(
                            f"{_describe(url)} redirected to a {next_scheme or 'relative'}: URL; "
                            "redirects may only go to http or https"
                        )
                    continue
                if not response.is_success:
                    phrase = f" {response.reason_phrase}" if response.reason_phrase else ""
                    raise MediaFetchError(
                        f"fetching {_describe(current)} failed: the server answered HTTP "
                        f"{response.status_code}{phrase}"
                    )
                return await self._read_body(response, current)
            finally:
                await response.aclose()
        raise AssertionError("unreachable: the redirect loop always returns or raises")

    async def _read_body(self, response: httpx.Response, url: str) -> bytes:
        cap = self._limits.max_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise LimitExceeded(_size_message(_describe(url), int(declared), cap))
        chunks: list[bytes] = []
        received = 0
        try:
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > cap:
                    raise LimitExceeded(_size_message(_describe(url), received, cap, at_least=True))
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise MediaFetchTimeout(
                f"reading {_describe(url)} stalled for more than {self._limits.read_timeout_s:g} s"
            ) from None
        except httpx.TransportError as e:
            raise MediaFetchError(
                f"the connection to {_describe(url)} failed mid-body: {_reason(e)}"
            ) from None
        return b"".join(chunks)

    async def _check_destination(self, url: str) -> None:
        """Refuses URLs whose host is, or resolves to, a non-public address (unless allowed)."""
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            raise MediaFetchError(f"the URL {_describe(url)} has no host")
        if self._limits.allow_private_networks:
            return
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise MediaFetchError(f"the URL {_describe(url)} has an invalid port") from None
        addresses = await _resolve(host, port)
        for address in addresses:
            if _is_forbidden_address(address):
                raise ForbiddenSource(
                    f"{_describe(url)} points to a non-public address ({address}); only public internet "
                    "hosts may be fetched"
                )


async def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    literal = host.strip("[]")
    try:
        return [ipaddress.ip_address(literal)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise MediaFetchError(f"could not resolve the host {host!r}: {reason}") from None
    addresses = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        # IPv6 sockaddr may carry a zone ("fe80::1%eth0"); the zone is irrelevant to the check.
        addresses.append(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
    if not addresses:
        raise MediaFetchError(f"the host {host!r} has no addresses")
    return addresses


def _is_forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and _is_forbidden_address(embedded):
            return True
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or not address.is_global  # e.g. 100.64.0.0/10 (carrier-grade NAT)
    )


def _decode_data_url(url: str, cap: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaFetchError("the data: URL has no ',' separating its header from its data")
    is_base64 = header.lower().endswith(";base64")
    if is_base64:
        text = "".join(unquote_to_bytes(payload).decode("ascii", errors="replace").split())
        decoded_size = len(text.rstrip("=")) * 3 // 4  # exact for valid base64, known before decoding
        if decoded_size > cap:
            raise LimitExceeded(_size_message("the data: URL", decoded_size, cap))
        text += "=" * (-len(text) % 4)
        try:
            altchars = b"-_" if ("-" in text or "_" in text) else None  # URL-safe alphabet
            data = base64.b64decode(text.encode("ascii"), altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            raise MediaFetchError("the data: URL says ;base64 but its data is not valid base64") from None
    else:
        if len(payload) // 3 > cap:  # every decoded byte takes at least one and at most three characters
            raise LimitExceeded(_size_message("the data: URL", len(payload) // 3, cap, at_least=True))
        data = unquote_to_bytes(payload)
    if len(data) > cap:
        raise LimitExceeded(_size_message("the data: URL", len(data), cap))
    return data


def _scheme_of(url: str) -> str:
    head, sep, _ = url.partition(":")
    if not sep or not head or not head[0].isalpha():
        return ""
    return head.strip().lower()


def _scheme_refusal(scheme: str) -> str:
    if not scheme:
        return "the media URL has no scheme; use an http://, https:// or data: URL"
    return f"{scheme}: URLs are not allowed; use an http://, https:// or data: URL"


def _describe(url: str) -> str:
    """The URL's scheme and host only, for messages (paths and queries of signed URLs carry secrets)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the media URL"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}"


def _reason(error: httpx.TransportError) -> str:
    cause: BaseException = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(error) or type(error).__name__


def _size_message(what: str, size: int, cap: int, *, at_least: bool = False) -> str:
    qualifier = "at least " if at_least else ""
    return f"{what} is {qualifier}{size} bytes; the limit is {cap} bytes"
