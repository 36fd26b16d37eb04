"""Fetching media bytes from what a request points at: http(s) URLs, data: URLs and local paths.

Every source is size-capped and time-limited. Which http(s) destinations may be reached is decided by
``url_policy`` (SSRF protection: public addresses only by default, domain allow/deny lists), on the first
request and on every redirect hop; redirects are followed here, one hop at a time, never by httpx.

The connection goes to the address that was checked. Each hop's host is resolved once (by the injected
``Resolver``), every address is checked, and the request is then sent to a URL whose host *is* one of
those addresses, with the original ``Host`` header and, for https, the original name as the TLS server
name (``sni_hostname``), against which the certificate is verified. httpx therefore never resolves the
name itself, and a DNS answer that changes after the check (DNS rebinding) has nothing to act on.
Connections are not kept alive between fetches, so no pooled connection made for one name can serve
another.

The body must come as is: ``identity`` is requested and a body with any other Content-Encoding is refused
before it is read, never inflated (no gzip bomb is expanded here). It is counted against the per-item and
per-request byte caps while it streams.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import ssl
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
from omnigate_gateway.resolver import Resolver, SystemResolver
from omnigate_gateway.url_policy import HTTP_SCHEMES, Destination, DestinationChecker, UrlPolicy

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "omnigate-gateway"
_MAX_ADDRESSES_TRIED = 3  # addresses of one host tried in turn when connecting fails


@dataclass(frozen=True)
class FetchLimits:
    """How far and how long the fetcher may go for one media item, and where it may go."""

    connect_timeout_s: float = 5.0  # time to open a connection to the media host
    read_timeout_s: float = 15.0  # longest wait for the next chunk of the body
    total_timeout_s: float = 30.0  # wall-clock limit for one item, redirects included
    max_bytes: int = 100 * 1024 * 1024  # largest body accepted for one item
    max_redirects: int = 5  # redirect hops followed before giving up
    allow_private_networks: bool = False  # allow loopback/private/link-local destinations (local dev only)
    local_files_root: str | None = None  # directory local paths may be read from; None disables paths
    allowed_networks: tuple[str, ...] = ()  # CIDR blocks reachable even when private networks are not
    allowed_domains: tuple[str, ...] = ()  # when set, only these domains (and subdomains) are fetched
    denied_domains: tuple[str, ...] = ()  # these domains (and subdomains) are never fetched

    def url_policy(self) -> UrlPolicy:
        return UrlPolicy(
            allow_private_networks=self.allow_private_networks,
            allowed_networks=self.allowed_networks,
            allowed_domains=self.allowed_domains,
            denied_domains=self.denied_domains,
        )


class RequestBudget:
    """Encoded bytes of all media of one request together; ``take`` raises once they pass ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise LimitExceeded(
                f"the request's media add up to more than {self.limit} bytes, the per-request limit"
            )


@dataclass(frozen=True)
class Validators:
    """What a cached copy of a URL is known by (sent back as If-None-Match / If-Modified-Since)."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)


@dataclass(frozen=True)
class FetchedMedia:
    """An http(s) fetch's body (None when the server said 304 Not Modified) and its caching headers."""

    data: bytes | None
    validators: Validators
    max_age_s: float | None = None  # Cache-Control max-age, when the server gave one
    no_store: bool = False  # Cache-Control: no-store

    @property
    def not_modified(self) -> bool:
        return self.data is None


class MediaFetcher:
    """Fetches media bytes with the limits above. Create one per server; close it with ``aclose()``.

    ``resolver`` answers name lookups (the system's by default; tests inject a fixed table), ``transport``
    replaces httpx's network transport (tests), ``verify`` is the TLS verification setting or context.
    """

    def __init__(
        self,
        limits: FetchLimits,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._limits = limits
        self._checker = DestinationChecker(limits.url_policy(), resolver or SystemResolver())
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
            limits=httpx.Limits(max_keepalive_connections=0),  # one connection per fetch, never reused
            transport=transport,
            verify=verify,
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

    async def fetch(
        self, url: str, *, budget: RequestBudget | None = None, max_bytes: int | None = None
    ) -> bytes:
        """Returns the bytes behind an http(s) or data: URL.

        Raises ForbiddenSource (scheme or destination not allowed), MediaFetchError (unreachable, HTTP
        error status, bad data: URL, too many redirects), LimitExceeded (over the limits' ``max_bytes``,
        a lower per-call ``max_bytes`` or the request's ``budget``) and MediaFetchTimeout (over a timeout).
        """
        fetched = await self.fetch_media(url, budget=budget, max_bytes=max_bytes)
        assert fetched.data is not None  # no validators were sent, so there is no 304
        return fetched.data

    async def fetch_media(
        self,
        url: str,
        *,
        budget: RequestBudget | None = None,
        validators: Validators | None = None,
        max_bytes: int | None = None,
    ) -> FetchedMedia:
        """Like ``fetch``, with the caching headers; with ``validators``, a 304 gives ``data=None``."""
        cap = self._cap(max_bytes)
        scheme = scheme_of(url)
        if scheme == "data":
            data = _decode_data_url(url, cap)
            if budget is not None:
                budget.take(len(data))
            return FetchedMedia(data, Validators())
        if scheme not in HTTP_SCHEMES:
            raise ForbiddenSource(_scheme_refusal(scheme))
        try:
            async with asyncio.timeout(self._limits.total_timeout_s):
                return await self._fetch_http(url, budget, validators, cap)
        except TimeoutError:
            raise MediaFetchTimeout(
                f"fetching {describe_url(url)} took longer than the limit of {self._limits.total_timeout_s:g} s"
            ) from None

    def read_local(
        self, path: str, *, budget: RequestBudget | None = None, max_bytes: int | None = None
    ) -> bytes:
        """Returns the bytes of a file under ``local_files_root`` (symlinks resolved first).

        Raises ForbiddenSource (local files disabled, or the path leaves the root), MediaFetchError (no
        such file, not a regular file, unreadable) and LimitExceeded (over ``max_bytes`` or ``budget``).
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
        cap = self._cap(max_bytes)
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
        if budget is not None:
            budget.take(len(data))
        return data

    def _cap(self, max_bytes: int | None) -> int:
        return self._limits.max_bytes if max_bytes is None else min(max_bytes, self._limits.max_bytes)

    async def _fetch_http(
        self, url: str, budget: RequestBudget | None, validators: Validators | None, cap: int
    ) -> FetchedMedia:
        current = url
        for hop in range(self._limits.max_redirects + 1):
            destination = await self._checker.check(current, shown_as=describe_url(current))
            response = await self._send(destination, current, validators)
            try:
                if response.status_code in _REDIRECT_STATUSES and "location" in response.headers:
                    if hop == self._limits.max_redirects:
                        raise MediaFetchError(
                            f"{describe_url(url)} redirected more than {self._limits.max_redirects} times; "
                            f"at most {self._limits.max_redirects} redirects are followed"
                        )
                    # Relative locations resolve against the URL as the user wrote it, not the pinned IP.
                    current = urljoin(current, response.headers["location"])
                    next_scheme = scheme_of(current)
                    if next_scheme not in HTTP_SCHEMES:
                        raise ForbiddenSource(
                            f"{describe_url(url)} redirected to a URL with the {next_scheme or 'no'} scheme; "
                            "redirects may only go to http or https"
                        )
                    continue
                if response.status_code == 304 and validators:
                    return FetchedMedia(None, validators, *_cache_control(response))
                if not response.is_success:
                    phrase = f" {response.reason_phrase}" if response.reason_phrase else ""
                    raise MediaFetchError(
                        f"fetching {describe_url(current)} failed: the server answered HTTP "
                        f"{response.status_code}{phrase}"
                    )
                data = await self._read_body(response, current, budget, cap)
                found = Validators(response.headers.get("etag"), response.headers.get("last-modified"))
                return FetchedMedia(data, found, *_cache_control(response))
            finally:
                await response.aclose()
        raise AssertionError("unreachable: the redirect loop always returns or raises")

    async def _send(
        self, destination: Destination, url: str, validators: Validators | None
    ) -> httpx.Response:
        """Sends the GET to the destination's checked addresses in turn (until one connects)."""
        headers = {"Host": destination.host_header}
        if validators:
            if validators.etag:
                headers["If-None-Match"] = validators.etag
            if validators.last_modified:
                headers["If-Modified-Since"] = validators.last_modified
        extensions = {}
        if destination.sni_hostname:
            extensions["sni_hostname"] = destination.sni_hostname
        last_error: httpx.TransportError | None = None
        for address in destination.addresses[:_MAX_ADDRESSES_TRIED]:
            request = self._client.build_request(
                "GET", destination.connect_url(address), headers=headers, extensions=extensions
            )
            try:
                return await self._client.send(request, stream=True)
            except httpx.TimeoutException:
                raise MediaFetchTimeout(
                    f"fetching {describe_url(url)} timed out (connect limit {self._limits.connect_timeout_s:g} s, "
                    f"read limit {self._limits.read_timeout_s:g} s)"
                ) from None
            except httpx.ConnectError as e:
                last_error = e  # try the next checked address
            except httpx.InvalidURL as e:
                raise MediaFetchError(f"the URL {describe_url(url)} is not valid: {e}") from None
            except httpx.TransportError as e:
                raise MediaFetchError(f"could not fetch {describe_url(url)}: {_reason(e)}") from None
        assert last_error is not None
        raise MediaFetchError(f"could not connect to {describe_url(url)}: {_reason(last_error)}")

    async def _read_body(
        self, response: httpx.Response, url: str, budget: RequestBudget | None, cap: int
    ) -> bytes:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise MediaFetchError(
                f"{describe_url(url)} sent a {encoding}-encoded body although none was asked for; media "
                "must be sent as is (no Content-Encoding)"
            )
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise LimitExceeded(_size_message(describe_url(url), int(declared), cap))
        chunks: list[bytes] = []
        received = 0
        try:
            async for chunk in response.aiter_bytes():  # identity only (checked above): raw bytes
                received += len(chunk)
                if received > cap:
                    raise LimitExceeded(_size_message(describe_url(url), received, cap, at_least=True))
                if budget is not None:
                    budget.take(len(chunk))
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise MediaFetchTimeout(
                f"reading {describe_url(url)} stalled for more than {self._limits.read_timeout_s:g} s"
            ) from None
        except httpx.TransportError as e:
            raise MediaFetchError(
                f"the connection to {describe_url(url)} failed mid-body: {_reason(e)}"
            ) from None
        return b"".join(chunks)


def _cache_control(response: httpx.Response) -> tuple[float | None, bool]:
    """(max-age seconds or None, no-store) from a response's Cache-Control header."""
    max_age: float | None = None
    no_store = False
    for directive in response.headers.get("cache-control", "").lower().split(","):
        name, _, value = directive.strip().partition("=")
        if name == "no-store":
            no_store = True
        elif name == "no-cache":
            max_age = 0.0
        elif name == "max-age" and max_age is None:
            try:
                max_age = max(0.0, float(value.strip().strip('"')))
            except ValueError:
                max_age = 0.0
    return max_age, no_store


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


def scheme_of(url: str) -> str:
    """The URL's scheme, lowercased ("" when it has none)."""
    head, sep, _ = url.partition(":")
    if not sep or not head or not head[0].isalpha():
        return ""
    return head.strip().lower()


def _scheme_refusal(scheme: str) -> str:
    if not scheme:
        return "the media URL has no scheme; use an http://, https:// or data: URL"
    return f"{scheme}: URLs are not allowed; use an http://, https:// or data: URL"


def describe_url(url: str) -> str:
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
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"the server's TLS certificate was refused ({cause.verify_message or cause.reason})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed ({cause.reason or cause})"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(error) or type(error).__name__


def _size_message(what: str, size: int, cap: int, *, at_least: bool = False) -> str:
    qualifier = "at least " if at_least else ""
    return f"{what} is {qualifier}{size} bytes; the limit is {cap} bytes"
