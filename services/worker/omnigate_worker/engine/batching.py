"""Continuous batching of text generation on top of transformers' own generation pieces.

Each request is prefilled on its own, exactly as ``generate`` does it (``_prepare_position_ids_for_generation``,
``_prefill`` with all its multimodal inputs), which gives it a KV cache, an attention mask and position ids.
It then joins the running batch: rows are left-padded to a common length (padding masked out, each row
keeping its own positions, so Qwen-Omni's multimodal rope positions carry on unchanged) and every decode
step runs all rows in one forward pass, through ``prepare_inputs_for_generation`` and
``_update_model_kwargs_for_generation`` like ``generate``'s loop. Each row has its own logits processors
(the ones ``generate`` would build for it), limit, stop strings and streamer; a row that finishes or is
cancelled leaves the batch at once and its cache rows are freed, and new rows join between steps.

Why not transformers' continuous batching (``generate_batch`` / ``ContinuousBatchingManager``): it serves
text-only decoder models through paged attention and takes token ids, not the pixel/audio features and
3-D rope positions of multimodal models; this loop keeps the model's own forward and cache.

The private ``GenerationMixin`` helpers used here are the ones ``generate`` itself calls in
transformers 5.23 (pinned); the equivalence tests compare this loop with ``generate`` and the pipeline.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from transformers import LogitsProcessorList
from transformers.cache_utils import DynamicCache, DynamicLayer

from omnigate.conversation import FinishReason, GenerationRequest, Summary, Timings
from omnigate.errors import DeadlineExceeded
from omnigate_worker.engine.base import Batch, EventSink
from omnigate_worker.engine.streaming import TextOutput

if TYPE_CHECKING:
    from omnigate_worker.speech.pipeline import TalkerFeed, ThinkerTap

log = logging.getLogger(__name__)

Done = Callable[[BaseException | None], None]


class Cancelled(Protocol):
    """Whether a row's request is cancelled: a threading.Event, or a talker row's speech._Either."""

    def is_set(self) -> bool: ...


class TokenSink(Protocol):
    """Where a row's chosen tokens go: its text streamer (streaming.TokenStreamer), or a talker row's codes."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass
class Row:
    """One request's sequence in the batch."""

    request: GenerationRequest
    emit: EventSink
    done: Done
    cancelled: Cancelled
    deadline: float | None
    tokens: list[int]  # prompt (unpadded) then generated ids
    prompt_len: int
    max_new_tokens: int
    eos: set[int]
    processors: LogitsProcessorList
    do_sample: bool
    generator: torch.Generator | None
    text: TextOutput | None  # None for a talker row (codes, no text; it ends in TalkerBatch)
    streamer: TokenSink
    started: float
    stop_flag: threading.Event = field(default_factory=threading.Event)
    finished_reason: FinishReason | Literal["deadline"] | None = None
    cache_len: int = 0  # tokens in the row's KV cache (slot runner)
    # A speech request's thinker row: its speech.ThinkerTap; its talker row: its speech.TalkerFeed (slot runner
    # only).
    speech: ThinkerTap | TalkerFeed | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class DecodeBatch(Batch):
    """The rows decoding together, with their batched cache and generate-style model kwargs."""

    def __init__(
        self, gen_model: Any, pad_token_id: int, max_rows: int = 32, max_tokens: int = 131072
    ) -> None:
        self._gen = gen_model  # the module whose generate() produces the text (Qwen-Omni: the thinker)
        self._pad = pad_token_id
        self._max_rows = max_rows
        self._max_tokens = max_tokens
        self.rows: list[Row] = []
        self._input_ids: torch.Tensor | None = None  # (B, L) left-padded history
        self._kwargs: dict[str, Any] = {}  # past_key_values, attention_mask, position_ids, use_cache

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return 0 if self._input_ids is None else int(self._input_ids.shape[1])

    def admits(self, prompt_tokens: int, admitted: list[int]) -> bool:
        """Room for one more row: below max_batch_size rows and max_batch_tokens padded tokens."""
        if len(self.rows) + len(admitted) >= self._max_rows:
            return False
        tokens = self.length * len(self.rows) + sum(admitted)
        return not admitted or tokens + prompt_tokens <= self._max_tokens

    # -- joining -----------------------------------------------------------------------------------

    def add(
        self, row: Row, input_ids: torch.Tensor, kwargs: dict[str, Any], first_logits: torch.Tensor
    ) -> None:
        """Adds a prefilled row and picks its first token from ``first_logits``.

        ``kwargs`` are the row's model kwargs after ``_update_model_kwargs_for_generation`` on its prefill
        outputs; once the first token is appended to ``input_ids``, the row is in the same phase as the
        batch (ids, mask and positions one longer than the cache), so it can be left-padded and stacked.
        """
        (token,) = pick_tokens([row], first_logits, lambda i: input_ids)
        input_ids = torch.cat([input_ids, input_ids.new_full((1, 1), token)], dim=1)
        if not self.rows:
            self._input_ids, self._kwargs = input_ids, kwargs
        else:
            assert self._input_ids is not None  # the batch has rows
            target = max(self.length, int(input_ids.shape[1]))
            if target > self.length:
                self._input_ids, self._kwargs = _left_pad(self._input_ids, self._kwargs, target, self._pad)
            row_ids, row_kwargs = _left_pad(input_ids, kwargs, target, self._pad)
            self._input_ids = torch.cat([self._input_ids, row_ids], dim=0)
            self._kwargs = _concat_kwargs(self._kwargs, row_kwargs)
        self.rows.append(row)

    # -- stepping ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every row; finished rows report and leave.

        Under ``inference_mode`` like the prefill (``start_row``): with autograd on, each step's outputs kept
        the previous step's attention inputs alive, so memory grew by one KV-cache copy per step.
        """
        self._drop_finished()
        if not self.rows:
            return
        gen = self._gen
        assert self._input_ids is not None  # the batch has rows
        model_inputs = gen.prepare_inputs_for_generation(
            self._input_ids, next_sequence_length=1, **self._kwargs
        )
        outputs = gen(**model_inputs, return_dict=True)
        self._kwargs = gen._update_model_kwargs_for_generation(outputs, self._kwargs)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        del outputs
        history = self._input_ids
        tokens = pick_tokens(
            self.rows, logits, lambda i: history[i : i + 1, history.shape[1] - len(self.rows[i].tokens) :]
        )
        column = torch.tensor(tokens, dtype=torch.long, device=self._input_ids.device).unsqueeze(1)
        self._input_ids = torch.cat([self._input_ids, column], dim=1)
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not end_if_finished(row)]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self._input_ids, self._kwargs = None, {}
            return
        assert self._input_ids is not None  # rows remain
        index = torch.tensor(keep, dtype=torch.long, device=self._input_ids.device)
        self._input_ids = self._input_ids.index_select(0, index)
        self._kwargs = _select_kwargs(self._kwargs, index)
        self._trim()

    def _trim(self) -> None:
        """Drops leading columns that are padding for every remaining row."""
        mask = self._kwargs["attention_mask"]
        used = mask.any(dim=0).nonzero()
        start = int(used[0, 0]) if len(used) else 0
        if start > 0:
            assert self._input_ids is not None  # rows remain
            self._input_ids = self._input_ids[:, start:]
            self._kwargs = _slice_kwargs(self._kwargs, start)

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors carried from one step to the next (ids, mask, positions, cache)."""
        kwargs = self._kwargs
        cache = kwargs.get("past_key_values")
        tensors = [
            t
            for t in (self._input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
            if t is not None
        ]
        return tensors + ([t for layer in cache.layers for t in (layer.keys, layer.values)] if cache else [])

    def fail_all(self, error: BaseException) -> None:
        for row in self.rows:
            row.done(error)
        self.rows = []
        self._input_ids, self._kwargs = None, {}


def pick_tokens(rows: list[Row], logits: torch.Tensor, history: Callable[[int], torch.Tensor]) -> list[int]:
    """Chooses every row's next token as generate() would (``history(i)``: row i's ids so far, (1, n))."""
    scores = logits
    for i, row in enumerate(rows):
        if row.processors:
            # Each processor directly: LogitsProcessorList.__call__ inspects signatures on every call (slow).
            row_history = history(i)
            row_scores = scores[i : i + 1]
            for processor in row.processors:
                row_scores = processor(row_history, row_scores)
            scores[i : i + 1] = row_scores
    greedy = torch.argmax(scores, dim=-1).tolist()
    tokens = []
    for i, row in enumerate(rows):
        token = greedy[i]
        if row.do_sample:
            probs = torch.softmax(scores[i : i + 1], dim=-1)
            token = int(torch.multinomial(probs, 1, generator=row.generator)[0, 0])
        _accept(row, token)
        tokens.append(token)
    return tokens


def _accept(row: Row, token: int) -> None:
    """Records and streams a row's new token, and notes why the row is done."""
    row.tokens.append(token)
    row.streamer.put(torch.tensor([token]))
    if token in row.eos:
        row.finished_reason = FinishReason.STOP
    elif row.stop_flag.is_set():
        row.finished_reason = FinishReason.STOP_SEQUENCE
    elif row.generated >= row.max_new_tokens:
        row.finished_reason = FinishReason.LENGTH
    elif row.deadline is not None and time.monotonic() > row.deadline:
        row.finished_reason = "deadline"


def end_if_finished(row: Row) -> bool:
    """Ends a row that is cancelled, expired or done (its summary, or its error); True if it ended."""
    if row.cancelled.is_set():
        row.done(None)
    elif row.finished_reason == "deadline":
        row.done(DeadlineExceeded("the request's deadline passed during generation"))
    elif row.finished_reason is not None:
        _finish(row)
    else:
        return False
    return True


def _finish(row: Row) -> None:
    assert row.text is not None  # a talker row (no text) ends in TalkerBatch._drop_finished
    row.streamer.end()
    row.text.flush()
    finished = time.monotonic()
    reason = FinishReason.STOP_SEQUENCE if row.text.stopped_by_string else row.finished_reason
    assert isinstance(reason, FinishReason)  # end_if_finished ends a row here only once it has its reason
    row.emit(
        Summary(
            finish_reason=reason,
            prompt_tokens=row.prompt_len,
            output_tokens=row.generated,
            timings=Timings(
                prefill_s=(row.text.first_output_at or finished) - row.started,
                generate_s=finished - row.started,
                total_s=finished - row.started,
            ),
        )
    )
    row.done(None)


# ---- batched kwargs --------------------------------------------------------------------------------
# The kwargs carried between steps are the ones generate() carries: the cache (batch on dim 0 of each
# layer's keys/values, sequence on dim -2), the 2-D attention mask, and position ids ((B, L), or (P, B, L)
# for models with multi-dimensional rope positions).


def _position_batch_dim(position_ids: torch.Tensor) -> int:
    return position_ids.dim() - 2


def _left_pad(input_ids: torch.Tensor, kwargs: dict, target: int, pad_id: int) -> tuple[torch.Tensor, dict]:
    missing = target - int(input_ids.shape[1])
    if missing <= 0:
        return input_ids, kwargs
    out = dict(kwargs)
    batch = input_ids.shape[0]
    input_ids = torch.cat([input_ids.new_full((batch, missing), pad_id), input_ids], dim=1)
    mask = kwargs["attention_mask"]
    out["attention_mask"] = torch.cat([mask.new_zeros((batch, missing)), mask], dim=1)
    if (pos := kwargs.get("position_ids")) is not None:
        shape = list(pos.shape)
        shape[-1] = missing
        out["position_ids"] = torch.cat([pos.new_zeros(shape), pos], dim=-1)
    out["past_key_values"] = _map_cache(
        kwargs["past_key_values"],
        lambda t: torch.cat([t.new_zeros((*t.shape[:-2], missing, t.shape[-1])), t], dim=-2),
    )
    return input_ids, out


def _concat_kwargs(a: dict, b: dict) -> dict:
    out = dict(a)
    out["attention_mask"] = torch.cat([a["attention_mask"], b["attention_mask"]], dim=0)
    if (pos := a.get("position_ids")) is not None:
        out["position_ids"] = torch.cat([pos, b["position_ids"]], dim=_position_batch_dim(pos))
    out["past_key_values"] = _zip_cache(
        a["past_key_values"], b["past_key_values"], lambda x, y: torch.cat([x, y], 0)
    )
    return out


def _select_kwargs(kwargs: dict, index: torch.Tensor) -> dict:
    out = dict(kwargs)
    out["attention_mask"] = kwargs["attention_mask"].index_select(0, index)
    if (pos := kwargs.get("position_ids")) is not None:
        out["position_ids"] = pos.index_select(_position_batch_dim(pos), index)
    out["past_key_values"] = _map_cache(kwargs["past_key_values"], lambda t: t.index_select(0, index))
    return out


def _slice_kwargs(kwargs: dict, start: int) -> dict:
    out = dict(kwargs)
    out["attention_mask"] = kwargs["attention_mask"][:, start:]
    if (pos := kwargs.get("position_ids")) is not None:
        out["position_ids"] = pos[..., start:]
    out["past_key_values"] = _map_cache(kwargs["past_key_values"], lambda t: t[..., start:, :])
    return out


def _map_cache(cache: DynamicCache, fn: Callable[[torch.Tensor], torch.Tensor]) -> DynamicCache:
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        layer, keys, values = _filled(layer)
        new = copy.copy(layer)
        new.keys, new.values = fn(keys), fn(values)
        out.layers.append(new)
    return out


def _zip_cache(
    a: DynamicCache, b: DynamicCache, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> DynamicCache:
    out = copy.copy(a)
    out.layers = []
    for la, lb in zip(a.layers, b.layers, strict=True):
        (la, keys_a, values_a), (_, keys_b, values_b) = _filled(la), _filled(lb)
        new = copy.copy(la)
        new.keys, new.values = fn(keys_a, keys_b), fn(values_a, values_b)
        out.layers.append(new)
    return out


def _filled(layer: object) -> tuple[DynamicLayer, torch.Tensor, torch.Tensor]:
    """A prefilled DynamicLayer, its keys and its values (the batch carries caches ``cache_is_batchable``)."""
    assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
    return layer, layer.keys, layer.values


def cache_is_batchable(cache: object) -> bool:
    """Only plain dynamic caches (every layer a full-length DynamicLayer) can be padded and merged."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)
