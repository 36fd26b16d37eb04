"""The engine interface: what the server and the scheduler need from a model runner.

The real implementation is ``TransformersEngine`` (transformers_engine.py). Tests about control flow
(cancellation, overload) may use a fake that implements this interface and says so in its name.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable

from omnigate.conversation import Event, GenerationRequest, ModelInfo

EventSink = Callable[[Event], None]


class Engine(abc.ABC):
    """Runs one request at a time on the calling thread, emitting events as they are produced."""

    info: ModelInfo

    @abc.abstractmethod
    def validate(self, request: GenerationRequest) -> None:
        """Raises InvalidInput if the model cannot serve this request (checked before queueing)."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest, emit: EventSink, cancelled: threading.Event) -> None:
        """Generates the response, calling ``emit`` for each event; the last event is a ``Summary``.

        Returns early (without a Summary) when ``cancelled`` is set.
        """

    def warmup(self) -> None:  # noqa: B027 - optional hook
        """Runs a tiny request so the first real one does not pay one-off costs."""
