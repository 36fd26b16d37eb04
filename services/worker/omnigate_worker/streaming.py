"""Turning generated tokens into streamed text: incremental detokenization and stop strings."""

from __future__ import annotations

import threading
import time

from transformers import TextStreamer

from omnigate.conversation import TextDelta
from omnigate_worker.engine import EventSink


class TokenStreamer(TextStreamer):
    """Decodes tokens as they are produced and hands finished text to the request's text handler."""

    def __init__(self, tokenizer, on_text, on_token, *, skip_prompt: bool = True) -> None:
        super().__init__(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)
        self._on_text = on_text
        self._on_token = on_token

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self._on_token(int(value.numel()))
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


class TextOutput:
    """Streams text deltas, holding back what could be the start of a stop string."""

    def __init__(self, emit: EventSink, stop_strings: list[str], stop_flag: threading.Event) -> None:
        self._emit = emit
        self._stops = [s for s in stop_strings if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self._stop_flag = stop_flag
        self.stopped_by_string = False
        self.first_output_at: float | None = None
        self.tokens = 0

    def on_token(self, count: int) -> None:
        self.tokens += count

    def on_text(self, text: str) -> None:
        if self.stopped_by_string:
            return
        self._pending += text
        if self._stops:
            cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
            if cut >= 0:
                self._send(self._pending[:cut])
                self._pending = ""
                self.stopped_by_string = True
                self._stop_flag.set()
                return
        ready = len(self._pending) - self._hold
        if ready > 0:
            self._send(self._pending[:ready])
            self._pending = self._pending[ready:]

    def flush(self) -> None:
        if not self.stopped_by_string and self._pending:
            self._send(self._pending)
        self._pending = ""

    def _send(self, text: str) -> None:
        if not text:
            return
        if self.first_output_at is None:
            self.first_output_at = time.monotonic()
        self._emit(TextDelta(text))
