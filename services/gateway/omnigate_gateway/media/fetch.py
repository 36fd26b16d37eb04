"""Fetching media bytes from what a request points at: http(s) URLs, data: URLs and local paths.

Every source is size-capped and time-limited. Which http(s) destinations may be reached is decided by
``policy`` (SSRF protection: public addresses only by default, domain allow/deny lists), on the first
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

Messages name a URL by its scheme and host only (``describe_url``) and repeat other input cut short
(``quote``); each response is logged as scheme://host[:port]/path (``loggable_url``): signed URLs carry
credentials in their query string and user info, which stay out of logs. httpx's own request line (the
pinned address with the full query) is kept out of the log for media fetches.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import errno
import logging
import os
import re
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx

from omnigate.errors import quote
from omnigate_gateway.errors import (
    ForbiddenSource,
    LimitExceeded,
    MediaFetchError,
    MediaFetchTimeout,
)
from omnigate_gateway.media.policy import HTTP_SCHEMES, Destination, DestinationChecker, UrlPolicy
from omnigate_gateway.media.resolver import Resolver, SystemResolver

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "omnigate-gateway"
_MAX_ADDRESSES_TRIED = 3  # addresses of one host tried in turn when connecting fails
_LOGGED_URL_LIMIT = 160  # characters of a URL a log line shows
_SHOWN_URL_LIMIT = 100  # characters of a URL's scheme and host a message shows as they are
_DETAIL_LIMIT = 120  # characters of a library's or a server's reason a message repeats
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,32}")

log = logging.getLogger(__name__)

# Set while a media fetch runs, so that the filter below can tell its log records from other httpx use.
_IN_MEDIA_FETCH: contextvars.ContextVar[bool] = contextvars.ContextVar("omnigate_media_fetch", default=False)


class _HideMediaFetchRecords(logging.Filter):
    """Drops httpx's and httpcore's records made inside a media fetch: httpx logs each request at INFO as
    the pinned address with the full query string (a signed URL's credentials), httpcore the response
    headers at DEBUG (a redirect's Location). The fetcher logs its own line per response instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _IN_MEDIA_FETCH.get()


_HIDE_MEDIA_FETCH_RECORDS = _HideMediaFetchRecords()
_HTTP_LIBRARY_LOGGERS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2")

_LOCATION = "omnigate.location"  # where a response's Location header is kept (``_take_location``)


async def _take_location(response: httpx.Response) -> None:
    """Moves a response's Location header out of httpx's reach, into its extensions.

    httpx builds the next request of every redirect, even when it does not follow redirects, and fails
    on a location it cannot follow (``data:text/plain,x``, ``javascript:...``) with an error that blames
    the URL asked for. Redirects are followed, and refused, by the fetcher, hop by hop.
    """
    location = response.headers.get("location")
    if location is not None:
        del response.headers["location"]
        response.extensions[_LOCATION] = location


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
        for name in _HTTP_LIBRARY_LOGGERS:  # (adding the same filter again does nothing)
            logging.getLogger(name).addFilter(_HIDE_MEDIA_FETCH_RECORDS)
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
            event_hooks={"response": [_take_location]},
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
        hidden = _IN_MEDIA_FETCH.set(True)
        try:
            async with asyncio.timeout(self._limits.total_timeout_s):
                return await self._fetch_http(url, budget, validators, cap)
        except TimeoutError:
            raise MediaFetchTimeout(
                f"fetching {describe_url(url)} took longer than the limit of {self._limits.total_timeout_s:g} s"
            ) from None
        finally:
            _IN_MEDIA_FETCH.reset(hidden)

    def read_local(
        self, path: str, *, budget: RequestBudget | None = None, max_bytes: int | None = None
    ) -> bytes:
        """Returns the bytes of a regular file under ``local_files_root`` (symlinks resolved first).

        Raises ForbiddenSource (local files disabled, the path leaves the root, or the gateway may not read
        it), MediaFetchError (no such file, a symlink loop, a path too long, a directory, FIFO, device or
        socket, unreadable) and LimitExceeded (over ``max_bytes`` or ``budget``). Never blocks on a FIFO:
        anything but a regular file is refused before it is opened, and opened without waiting.
        """
        root_setting = self._limits.local_files_root
        if not root_setting:
            raise ForbiddenSource("reading local files is not enabled on this gateway; send a URL instead")
        shown = quote(path)
        root = Path(root_setting).resolve()
        try:
            # An absolute path replaces root; ".." and symlinks resolved (lexically where they loop).
            candidate = Path(os.path.realpath(root / path))
        except ValueError:  # an embedded NUL byte
            raise MediaFetchError(f"{shown} is not a valid local path") from None
        if not candidate.is_relative_to(root):
            raise ForbiddenSource(f"local paths must be inside {root}; {shown} is not")
        _check_path_length(root / path, shown, root)
        try:
            # Resolved again, strictly: a loop anywhere, a missing part or a name too long is an error now.
            resolved = os.path.realpath(root / path, strict=True)
            info = os.stat(resolved)
            _require_regular_file(info.st_mode, shown)
            fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise _local_file_error(e, shown, root) from None
        if not Path(resolved).is_relative_to(root):  # changed between the two resolutions
            os.close(fd)
            raise ForbiddenSource(f"local paths must be inside {root}; {shown} is not")
        cap = self._cap(max_bytes)
        try:
            with open(fd, "rb") as f:  # owns fd from here on
                opened = os.fstat(fd)
                _require_regular_file(opened.st_mode, shown)
                if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                    raise MediaFetchError(f"{shown} changed while it was being opened; try again")
                if opened.st_size > cap:
                    raise LimitExceeded(_size_message(shown, opened.st_size, cap))
                data = f.read(cap + 1)
        except OSError as e:
            raise _local_file_error(e, shown, root) from None
        if len(data) > cap:  # the file grew after the size check
            raise LimitExceeded(_size_message(shown, len(data), cap, at_least=True))
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
            log.info("media fetch: GET %s -> %d", loggable_url(current), response.status_code)
            try:
                location = response.extensions.get(_LOCATION)
                if response.status_code in _REDIRECT_STATUSES and location is not None:
                    if hop == self._limits.max_redirects:
                        raise MediaFetchError(
                            f"{describe_url(url)} redirected more than {self._limits.max_redirects} times; "
                            f"at most {self._limits.max_redirects} redirects are followed"
                        )
                    # Relative locations resolve against the URL as the user wrote it, not the pinned IP.
                    came_from = describe_url(current)
                    try:
                        current = urljoin(current, location)
                    except ValueError:  # e.g. "http://[::1" (an unclosed IPv6 literal)
                        raise MediaFetchError(
                            f"{came_from} redirected to a malformed URL; redirects must name an http:// or "
                            "https:// URL"
                        ) from None
                    next_scheme = scheme_of(current)
                    if next_scheme not in HTTP_SCHEMES:
                        raise ForbiddenSource(
                            f"the media URL was redirected to {_describe_target(next_scheme)} by {came_from}; "
                            "redirects may only go to http:// or https:// URLs"
                        )
                    continue
                if response.status_code == 304 and validators:
                    return FetchedMedia(None, validators, *_cache_control(response))
                if not response.is_success:
                    phrase = f" {_detail(response.reason_phrase, 64)}" if response.reason_phrase else ""
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
                raise MediaFetchError(
                    f"the URL {describe_url(url)} is not valid: {_detail(str(e))}"
                ) from None
            except httpx.TransportError as e:
                raise MediaFetchError(f"could not fetch {describe_url(url)}: {_reason(e)}") from None
        assert last_error is not None
        raise MediaFetchError(f"could not connect to {describe_url(url)}: {_reason(last_error)}")

    async def _read_body(
        self, response: httpx.Response, url: str, budget: RequestBudget | None, cap: int
    ) -> bytes:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            encoding = encoding if _TOKEN.fullmatch(encoding) else quote(encoding)
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
    if _SCHEME.fullmatch(scheme):
        return f"{scheme}: URLs are not allowed; use an http://, https:// or data: URL"
    return f"URLs with the scheme {quote(scheme)} are not allowed; use an http://, https:// or data: URL"


def _describe_target(scheme: str) -> str:
    """What a redirect pointed at, for messages: "a data: URL" (never the URL itself)."""
    if not scheme:
        return "a URL without a scheme"
    if _SCHEME.fullmatch(scheme):
        return f"a {scheme}: URL"
    return f"a URL with the scheme {quote(scheme)}"


def describe_url(url: str) -> str:
    """The URL's scheme and host only, for messages (paths, queries and user info of signed URLs carry
    secrets); over ``_SHOWN_URL_LIMIT`` characters it is cut and quoted (``quote``)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        if ":" in host:
            host = f"[{host}]"
        text = f"{parts.scheme}://{host}{port}"
    except ValueError:  # e.g. an unclosed "[" or a port that is no number: the text up to the path
        scheme, _, rest = url.partition("://")
        text = f"{scheme}://{rest.split('/', 1)[0].rpartition('@')[2]}"
    return text if len(text) <= _SHOWN_URL_LIMIT and text.isprintable() else quote(text)


def loggable_url(url: str, limit: int = _LOGGED_URL_LIMIT) -> str:
    """A URL for a log line: scheme://host[:port]/path, without user info, query or fragment (signed URLs
    carry credentials there), control characters escaped, cut to ``limit`` characters."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        parts, host, port = None, "", None
    if parts is not None and host:
        if ":" in host:
            host = f"[{host}]"
        scheme = f"{parts.scheme}:" if parts.scheme else ""
        text = f"{scheme}//{host}{'' if port is None else f':{port}'}{parts.path}"
    else:  # not a URL with a host: the text before any query or fragment
        text = re.split(r"[?#]", url, maxsplit=1)[0]
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _detail(text: str, limit: int = _DETAIL_LIMIT) -> str:
    """A library's or a server's reason for a message, cut to ``limit`` characters."""
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _require_regular_file(mode: int, shown: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "a named pipe (FIFO)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    else:
        kind = "a special file"
    raise MediaFetchError(f"{shown} is {kind}, not a regular file")


def _local_file_error(error: OSError, shown: str, root: Path) -> MediaFetchError | ForbiddenSource:
    """The domain error for an OSError met while resolving, checking or reading a local path."""
    code = error.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        return MediaFetchError(f"no such file: {shown}")
    if code == errno.ELOOP:
        return MediaFetchError(
            f"{shown} cannot be resolved: its symbolic links form a loop (or are nested deeper than the "
            "system allows)"
        )
    if code == errno.ENAMETOOLONG:
        return _path_too_long(shown, root)
    if code in (errno.EACCES, errno.EPERM):
        return ForbiddenSource(f"the gateway is not allowed to read {shown} (permission denied)")
    if code == errno.EISDIR:
        return MediaFetchError(f"{shown} is a directory, not a regular file")
    reason = (error.strerror or type(error).__name__).lower()
    return MediaFetchError(f"could not read {shown}: {reason}")


def _check_path_length(path: Path, shown: str, root: Path) -> None:
    """Refuses a path longer than the file system takes (before it is looked up: a missing part of it
    would otherwise be reported first)."""
    encoded = os.fsencode(path)
    name_max = _path_conf(root, "PC_NAME_MAX", 255)
    if len(encoded) >= _path_conf(root, "PC_PATH_MAX", 4096) or any(
        len(name) > name_max for name in encoded.split(b"/")
    ):
        raise _path_too_long(shown, root)


def _path_too_long(shown: str, root: Path) -> MediaFetchError:
    name_max, path_max = _path_conf(root, "PC_NAME_MAX", 255), _path_conf(root, "PC_PATH_MAX", 4096)
    return MediaFetchError(
        f"the local path {shown} is too long; the file system takes at most {name_max} bytes per name "
        f"and {path_max} bytes in all"
    )


def _path_conf(root: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(root, name))
    except (OSError, ValueError):
        return default


def _reason(error: httpx.TransportError) -> str:
    cause: BaseException = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"the server's TLS certificate was refused ({_detail(str(cause.verify_message or cause.reason))})"
        )
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed ({_detail(str(cause.reason or cause))})"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return _detail(str(error)) or type(error).__name__


def _size_message(what: str, size: int, cap: int, *, at_least: bool = False) -> str:
    qualifier = "at least " if at_least else ""
    return f"{what} is {qualifier}{size} bytes; the limit is {cap} bytes"
