"""Turning generated tokens into streamed text: incremental detokenization and stop strings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TextStreamer

from omnigate.conversation import TextDelta
from omnigate_worker.engine.base import EventSink


class TokenStreamer(TextStreamer):
    """Decodes tokens as they are produced and hands new text to the request's text handler.

    transformers' TextStreamer holds text back until a whole word (a space) is there; this one releases
    every token's text as soon as it is final: everything but a trailing U+FFFD, which is what an
    incomplete multi-byte character decodes to until its next bytes arrive. The concatenated deltas equal
    the full decode. Tokenizers that clean up spaces (which can rewrite earlier text) keep the word rule.
    """

    def __init__(
        self,
        tokenizer: Any,
        on_text: Callable[[str], None],
        on_token: Callable[[int], None],
        *,
        skip_prompt: bool = True,
    ) -> None:
        super().__init__(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)
        self._on_text = on_text
        self._on_token = on_token
        self._per_token = not getattr(tokenizer, "clean_up_tokenization_spaces", False)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self._on_token(int(value.numel()))
        if not self._per_token:
            super().put(value)
            return
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        assert isinstance(text, str)  # one sequence's ids decode to one string
        stable = len(text.rstrip("\ufffd"))
        if stable > self.print_len:
            self.on_finalized_text(text[self.print_len : stable])
            self.print_len = stable
        if stable == len(text) and text.endswith("\n"):
            self.token_cache, self.print_len = [], 0  # as TextStreamer: start afresh after a newline

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
