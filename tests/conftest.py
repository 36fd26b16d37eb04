"""Fixtures shared by all tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # makes tests/media_factory.py and tests/media_server.py importable
    sys.path.insert(0, str(TESTS_DIR))

from media_server import MediaServer  # noqa: E402


@pytest.fixture(scope="session")
def media_server() -> Iterator[MediaServer]:
    """A local HTTP server (OS-chosen port) serving ``media_server.files``; tests add files with ``serve``."""
    server = MediaServer({})
    server.start()
    try:
        yield server
    finally:
        server.stop()
