"""Shared set-up of the atheris fuzz targets in this folder (each target is its own script)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import atheris

from omnigate_gateway.errors import OmnigateError


def run(decode: Callable[[bytes], object]) -> None:
    """Fuzzes ``decode``: for any input it must return, or raise a domain error (OmnigateError).

    Anything else (a library exception leaking out, a crash, a hang past libFuzzer's -timeout, memory
    past -rss_limit_mb) is a finding; libFuzzer saves the input and exits non-zero.
    """
    warnings.simplefilter("ignore")

    def one_input(data: bytes) -> None:
        try:
            decode(data)
        except OmnigateError as e:
            if not str(e):
                raise AssertionError("a domain error without a message") from e

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
