"""Fixtures that start the real worker and gateway as processes on OS-chosen loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.stack import MODELS_DIR, Service, Stack, start_service, start_stack, wait_serving

__all__ = ["MODELS_DIR", "Service", "Stack", "start_service", "start_stack", "wait_serving"]


@pytest.fixture(scope="session")
def omni_stack(tmp_path_factory) -> Iterator[Stack]:
    stack = start_stack(MODELS_DIR / "tiny-qwen2.5-omni", tmp_path_factory.mktemp("omni"))
    yield stack
    stack.gateway.stop()
    stack.worker.stop()


@pytest.fixture(scope="session")
def janus_stack(tmp_path_factory) -> Iterator[Stack]:
    stack = start_stack(MODELS_DIR / "tiny-janus", tmp_path_factory.mktemp("janus"))
    yield stack
    stack.gateway.stop()
    stack.worker.stop()
