"""Fixtures that start the real worker and gateway as processes on OS-chosen loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.stack import MODELS_DIR, Service, Stack, start_service, start_stack, wait_serving

__all__ = ["MODELS_DIR", "Service", "Stack", "start_service", "start_stack", "wait_serving"]


def _serve(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A worker serving ``models/<model>`` and a gateway in front of it, for the whole session."""
    stack = start_stack(MODELS_DIR / model, tmp_path_factory.mktemp(model.removeprefix("tiny-")))
    yield stack
    stack.gateway.stop()
    stack.worker.stop()


@pytest.fixture(scope="session")
def omni_stack(tmp_path_factory) -> Iterator[Stack]:
    yield from _serve("tiny-qwen2.5-omni", tmp_path_factory)


@pytest.fixture(scope="session")
def janus_stack(tmp_path_factory) -> Iterator[Stack]:
    yield from _serve("tiny-janus", tmp_path_factory)


@pytest.fixture(scope="session")
def qwen2_audio_stack(tmp_path_factory) -> Iterator[Stack]:
    """The tiny Qwen2-Audio: audio and text in, text out."""
    yield from _serve("tiny-qwen2-audio", tmp_path_factory)
