"""Fixtures for the SDK and CLI tests: the real stack (tiny Qwen2.5-Omni) for end-to-end checks.

The fake gateway (``fake_gateway.py``) serves the control-flow tests: retries, deadlines, metadata, TLS.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import MODELS_DIR, Stack, start_stack


@pytest.fixture(scope="session")
def sdk_stack(tmp_path_factory) -> Iterator[Stack]:
    """A worker (tiny Qwen2.5-Omni) and a gateway, started once for the SDK tests."""
    stack = start_stack(MODELS_DIR / "tiny-qwen2.5-omni", tmp_path_factory.mktemp("sdk"))
    yield stack
    stack.gateway.stop()
    stack.worker.stop()
