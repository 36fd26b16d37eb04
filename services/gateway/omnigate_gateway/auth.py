"""Who may call the gateway, and how much: API keys, per-key rate and concurrency limits.

Every front door hands the caller's credential to ``Authenticator`` through ``Call.api_key`` (``credential``
reads it from ``authorization: Bearer <key>`` or ``x-api-key: <key>``). With no keys file configured
(``OMNIGATE_GATEWAY_API_KEYS_FILE`` unset), every call is admitted (local development).

The keys file (a mounted Secret) holds one key per line, blank lines and ``#`` comments ignored::

    # name:secret[:option=value...]
    alice:3f1c9a0e7b5d4c2a8e6f
    batch-jobs:9d8e7f6a5b4c3d2e1f0a:rps=2:burst=4:concurrency=1

The name is the principal (logs, error messages); the secret may not contain ``:`` or whitespace. Options
override the defaults for that key: ``rps`` (Generate requests per second, 0 = unlimited), ``burst``
(bucket size) and ``concurrency`` (open Generate streams, 0 = unlimited). Only SHA-256 digests of the
secrets are kept in memory, and a presented key is matched by its digest with ``hmac.compare_digest``.
The file is checked for changes at most every ``api_keys_reload_interval_s`` when calls arrive (``stat``
follows the Secret volume's symlinks), so adding or removing a line takes effect without a restart; a
removed key is refused from then on, while streams it already opened run to their end. A line that cannot
be parsed is skipped (its key refused) and logged with its line number, never its secret.

Limits apply to Generate; GetModelInfo only needs a valid key. Health checks and reflection are separate
gRPC services that never reach the core: they stay unauthenticated (probes and load balancers use them).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from omnigate.errors import LimitExceeded, Unauthenticated
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# A refused stream cannot know when a slot frees: this is the delay suggested in its RetryInfo.
CONCURRENCY_RETRY_AFTER_S = 1.0

# How to send a key, in the words of each front door (gRPC metadata, HTTP headers).
NO_KEY_MESSAGES = {
    "grpc": "this gateway needs an API key: send the metadata 'authorization: Bearer <key>' (or 'x-api-key')",
    "http": "this gateway needs an API key: send the header 'Authorization: Bearer <key>' (or 'X-API-Key')",
}
NO_KEY_MESSAGE = NO_KEY_MESSAGES["grpc"]
BAD_KEY_MESSAGE = "the API key is not valid (unknown or revoked)"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SECRET = re.compile(r"[^\s:]+")
_OPTIONS = {"rps": float, "burst": int, "concurrency": int}


def credential(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """The API key a caller presented: ``Authorization: Bearer <key>``, else ``x-api-key: <key>``."""
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: its name, the digest of its secret and its limit overrides (None = the default)."""

    name: str
    digest: bytes
    requests_per_s: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None


def parse_keys(text: str, source: str = "api keys file") -> tuple[dict[bytes, ApiKey], list[str]]:
    """Parses a keys file: the keys by digest, and one problem per refused line (never naming a secret)."""
    keys: dict[bytes, ApiKey] = {}
    names: set[str] = set()
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        fields = line.split(":")
        if len(fields) < 2:
            problems.append(f"{where}: expected name:secret[:option=value...]")
            continue
        name, secret, options = fields[0].strip(), fields[1].strip(), fields[2:]
        if not _NAME.fullmatch(name):
            problems.append(f"{where}: the name must be 1-64 of A-Z a-z 0-9 . _ @ - (starting alphanumeric)")
            continue
        if not _SECRET.fullmatch(secret):
            problems.append(f"{where} ({name}): the secret is empty or contains whitespace")
            continue
        overrides: dict[str, float | int] = {}
        for option in options:
            key, _, value = option.strip().partition("=")
            try:
                parsed = _OPTIONS[key](value)
            except (KeyError, ValueError):
                problems.append(
                    f"{where} ({name}): option {option.strip()!r} is not one of rps=<number>, burst=<integer>, "
                    "concurrency=<integer>"
                )
                break
            if parsed < 0 or (key == "burst" and parsed < 1) or not math.isfinite(parsed):
                problems.append(f"{where} ({name}): {key} must be {'>= 1' if key == 'burst' else '>= 0'}")
                break
            overrides[key] = parsed
        else:
            digest = _digest(secret)
            if name in names:
                problems.append(f"{where}: the name {name!r} is used by an earlier line")
                continue
            if digest in keys:
                problems.append(f"{where} ({name}): the same secret as {keys[digest].name!r}")
                continue
            names.add(name)
            burst, concurrency = overrides.get("burst"), overrides.get("concurrency")
            keys[digest] = ApiKey(
                name,
                digest,
                requests_per_s=overrides.get("rps"),
                burst=int(burst) if burst is not None else None,  # parsed with int() above
                max_concurrent=int(concurrency) if concurrency is not None else None,
            )
    return keys, problems


class KeyStore:
    """The keys of one file, re-read when the file changes (checked at most once per ``interval_s``)."""

    def __init__(self, path: str, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._interval_s = interval_s
        self._clock = clock
        self._version: tuple[int, ...] | None = None
        self._next_check = 0.0
        self.keys: dict[bytes, ApiKey] = {}
        self.reloads = 0
        try:
            self._load(self._stat())
        except OSError as e:
            raise ValueError(f"cannot read the API keys file {path}: {e.strerror or e}") from None
        if not self.keys:
            log.warning("the API keys file %s has no valid key: every call will be refused", path)

    def _stat(self) -> tuple[int, ...]:
        st = os.stat(self.path)  # follows symlinks: a Secret volume update is a new inode
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self, version: tuple[int, ...]) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        keys, problems = parse_keys(text, os.path.basename(self.path))
        for problem in problems:
            log.error("API key refused: %s", problem)
        self.keys = keys
        self._version = version
        self.reloads += 1
        log.info("API keys loaded from %s: %d key(s)", self.path, len(keys))

    def refresh(self) -> None:
        """Re-reads the file if it changed since the last read (rate-limited)."""
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._interval_s
        try:
            version = self._stat()
            if version != self._version:
                self._load(version)
        except OSError as e:
            # A missing file is most likely a Secret being replaced: keep the keys we have, say so.
            log.error(
                "cannot read the API keys file %s (%s); keeping the %d key(s) loaded",
                self.path,
                e,
                len(self.keys),
            )

    def lookup(self, secret: str) -> ApiKey | None:
        digest = _digest(secret)
        key = self.keys.get(digest)
        if key is not None and hmac.compare_digest(key.digest, digest):
            return key
        return None


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; a request takes one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one will be available."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Caller(Protocol):
    """What the authenticator reads of a call (``core.Call``): the credential it presented and its front
    door ("grpc" or "http", which words the refusal)."""

    api_key: str | None
    protocol: str


class Authenticator:
    """Checks API keys (when a keys file is configured) and holds per-key rate and concurrency limits."""

    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._store = (
            KeyStore(settings.api_keys_file, settings.api_keys_reload_interval_s, clock)
            if settings.api_keys_file
            else None
        )
        self._lock = threading.Lock()  # front doors may run on other threads
        self._buckets: dict[str, TokenBucket] = {}
        self._open: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def _reject(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.rejected.labels(reason).inc()

    def _key(self, call: Caller) -> ApiKey | None:
        if self._store is None:
            return None
        with self._lock:
            reloads = self._store.reloads
            self._store.refresh()
            if self._store.reloads != reloads:  # forget the buckets of removed keys
                names = {k.name for k in self._store.keys.values()}
                self._buckets = {n: b for n, b in self._buckets.items() if n in names}
            key = self._store.lookup(call.api_key) if call.api_key else None
        if call.api_key is None:
            self._reject("unauthenticated")
            raise Unauthenticated(NO_KEY_MESSAGES.get(call.protocol, NO_KEY_MESSAGE))
        if key is None:
            self._reject("unauthenticated")
            raise Unauthenticated(BAD_KEY_MESSAGE)
        return key

    def authenticate(self, call: Caller) -> str | None:
        """The principal (key name) of the call; raises Unauthenticated when its credential is refused."""
        key = self._key(call)
        return key.name if key is not None else None

    @contextlib.asynccontextmanager
    async def admit(self, call: Caller) -> AsyncIterator[str | None]:
        """Authenticates the call, applies its key's rate limit and holds one of its concurrency slots."""
        key = self._key(call)
        if key is None:
            yield None
            return
        s = self._settings
        rate = key.requests_per_s if key.requests_per_s is not None else s.api_key_requests_per_s
        burst = key.burst if key.burst is not None else s.api_key_burst
        limit = key.max_concurrent if key.max_concurrent is not None else s.api_key_max_concurrent
        with self._lock:
            open_now = self._open.get(key.name, 0)
            if limit > 0 and open_now >= limit:
                self._reject("concurrency_limited")
                raise LimitExceeded(
                    f"API key {key.name!r} already has {open_now} Generate stream(s) open; its limit is {limit}",
                    retry_after_s=CONCURRENCY_RETRY_AFTER_S,
                )
            if rate > 0:
                now = self._clock()
                bucket = self._buckets.get(key.name)
                if bucket is None or bucket.rate != rate or bucket.burst != burst:
                    bucket = self._buckets[key.name] = _resized(bucket, rate, burst, now)
                wait = bucket.take(now)
                if wait > 0:
                    self._reject("rate_limited")
                    raise LimitExceeded(
                        f"API key {key.name!r} is over its rate limit of {rate:g} Generate request(s)/s "
                        f"(burst {burst}); retry in {wait:.2f} s",
                        retry_after_s=wait,
                    )
            self._open[key.name] = open_now + 1
        try:
            yield key.name
        finally:
            with self._lock:
                left = self._open.get(key.name, 1) - 1
                if left > 0:
                    self._open[key.name] = left
                else:
                    self._open.pop(key.name, None)


def _resized(bucket: TokenBucket | None, rate: float, burst: int, now: float) -> TokenBucket:
    """A bucket with new limits (a reloaded keys file), keeping the tokens the key had left."""
    fresh = TokenBucket(rate, burst, now)
    if bucket is not None:
        bucket.tokens = min(float(bucket.burst), bucket.tokens + (now - bucket.updated) * bucket.rate)
        fresh.tokens = min(float(burst), bucket.tokens)
    return fresh
