"""The engine interface: what the server and the scheduler need from a model runner.

The real implementation is ``TransformersEngine`` (transformers_engine.py). Tests about control flow
(cancellation, overload) may use a fake that implements this interface and says so in its name.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omnigate.conversation import Event, GenerationRequest, ModelInfo

EventSink = Callable[[Event], None]


@dataclass
class Prepared:
    """A request after CPU preprocessing (chat template, processor), ready for the model."""

    request: GenerationRequest
    inputs: Any  # the processor's BatchFeature (or whatever the engine needs)
    prompt_len: int
    trace_context: Any = None  # the request's trace (its worker.generate span), for spans recorded later


class Batch(abc.ABC):
    """Requests decoding together; rows join between steps and leave when done."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """Sequence length of the batch (tokens per row, padding included)."""

    @abc.abstractmethod
    def admits(self, prompt_tokens: int, admitted: list[int]) -> bool:
        """Whether a request of ``prompt_tokens`` may join now, after the prompts in ``admitted`` (already
        chosen to join before the next step)."""

    @abc.abstractmethod
    def step(self) -> None:
        """One decode step for every row; rows that finish emit their summary and call their ``done``."""

    def state_tensors(self) -> list:
        """The tensors carried from one step to the next (for checks: none may carry autograd history)."""
        return []

    @abc.abstractmethod
    def fail_all(self, error: BaseException) -> None:
        """Ends every row with ``error``."""


class Engine(abc.ABC):
    """What the scheduler drives. Blocking methods run on the engine thread, except ``prepare``."""

    info: ModelInfo

    @abc.abstractmethod
    def validate(self, request: GenerationRequest) -> None:
        """Raises InvalidInput if the model cannot serve this request (checked before queueing)."""

    @abc.abstractmethod
    def prepare(self, request: GenerationRequest) -> Prepared:
        """CPU preprocessing (chat template, processor); may run on another thread. May raise LimitExceeded."""

    @abc.abstractmethod
    def can_batch(self, prepared: Prepared) -> bool:
        """Whether this request can join a decode batch."""

    @abc.abstractmethod
    def open_batch(self) -> Batch:
        """A new, empty batch."""

    @abc.abstractmethod
    def start_row(
        self,
        batch: Batch,
        prepared: Prepared,
        emit: EventSink,
        done: Callable,
        cancelled: threading.Event,
        deadline: float | None,
    ) -> None:
        """Prefills a request and adds it to ``batch``; ``done(error_or_None)`` is called once it leaves."""

    @abc.abstractmethod
    def run(self, prepared: Prepared, emit: EventSink, cancelled: threading.Event) -> None:
        """Runs one request on its own, emitting its events; returns early (no Summary) when cancelled."""

    def warmup(self) -> None:  # noqa: B027 - optional hook
        """Runs a tiny request so the first real one does not pay one-off costs."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases what the engine holds beside the model (KV-cache slots, CUDA graphs)."""
