"""Waiting for a condition with a deadline, instead of sleeping a fixed time and hoping it happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "", interval_s=0.02):
    """Returns ``predicate()``'s first true value; fails once ``timeout_s`` passed without one."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what or predicate}")
        time.sleep(interval_s)
    return result


async def async_wait_until(
    predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "", interval_s=0.02
):
    """``wait_until`` for a coroutine: sleeps on the event loop between checks."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what or predicate}")
        await asyncio.sleep(interval_s)
    return result
