"""Stopping a decode that runs in a worker thread: the request was cancelled or its time ran out.

A thread cannot be interrupted from outside, so decoders call ``StopSignal.check()`` between units of
work (a packet, a frame, a block of samples). The event loop side calls ``cancel()`` when the request's
task is cancelled (its client went away); the deadline covers both the per-item decode time limit and the
request's own deadline.
"""

from __future__ import annotations

import threading
import time

from omnigate_gateway.errors import DecodeCancelled, MediaDecodeTimeout


class StopSignal:
    """Tells a running decode to stop: cancelled by the request, or past ``deadline`` (time.monotonic())."""

    def __init__(
        self,
        deadline: float | None = None,
        *,
        what: str = "decoding the media",
        limit: str = "its time limit",
    ) -> None:
        self._cancelled = threading.Event()
        self._deadline = deadline
        self._what = what
        self._limit = limit  # names the limit in the timeout message, e.g. "the decode limit of 60 s"

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raises DecodeCancelled or MediaDecodeTimeout when the decode should stop; cheap otherwise."""
        if self._cancelled.is_set():
            raise DecodeCancelled(f"{self._what} stopped: the request was cancelled")
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise MediaDecodeTimeout(f"{self._what} ran past {self._limit}")


NEVER = StopSignal()  # for callers (tests, benchmarks) that decode without a deadline
