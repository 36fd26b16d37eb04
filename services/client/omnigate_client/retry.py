"""When to retry a failed call, and how long to wait first.

Retried: ``UNAVAILABLE`` (no worker ready yet, a gateway restarting, a connection refused; after a
cold start's wait the gateway attaches a ``RetryInfo`` sized to one, which is waited), and
``RESOURCE_EXHAUSTED`` only when the server attached a ``RetryInfo`` (a full queue, a rate limit), never a
request over a size limit. A ``Generate`` stream is never retried once its first event arrived: the
answer has started, and repeating it would duplicate output. The waits grow exponentially with jitter; a
``RetryInfo`` delay is honoured (waited at least). The call's deadline covers all attempts: no retry
starts that could not finish its wait before the deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from omnigate_client.errors import OmnigateClientError


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter."""

    max_retries: int = 3  # retries after the first attempt (0 = never retry)
    initial_backoff_s: float = 0.2  # wait before the first retry (before jitter)
    max_backoff_s: float = 5.0  # the longest wait between attempts (a RetryInfo delay may be longer)
    multiplier: float = 2.0  # growth of the wait per retry
    jitter: float = 0.5  # fraction of each backoff drawn at random (0 = none, 1 = full jitter)
    max_retry_after_s: float = 60.0  # a RetryInfo delay longer than this is not waited for

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """The wait before retry number ``retry`` (1-based), jittered."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        rand = (rng or random).random()
        return base * (1 - self.jitter) + base * self.jitter * rand

    def delay(self, error: OmnigateClientError, retry: int, rng: random.Random | None = None) -> float | None:
        """Seconds to wait before retry number ``retry`` after ``error``, or None when not to retry."""
        if retry > self.max_retries:
            return None
        code = error.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            if error.retry_after is not None:
                return self._honour(error.retry_after, retry, rng)
            return self.backoff(retry, rng)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None:
            return self._honour(error.retry_after, retry, rng)
        return None

    def _honour(self, retry_after: float, retry: int, rng: random.Random | None) -> float | None:
        if retry_after > self.max_retry_after_s:
            return None
        # At least the server's delay; a little jitter on top spreads out clients refused together.
        return max(retry_after, 0.0) + 0.1 * self.backoff(retry, rng)


NO_RETRY = RetryPolicy(max_retries=0)
