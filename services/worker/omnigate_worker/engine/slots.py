"""The slot runner: batched decoding over preallocated KV-cache slots, replayed as CUDA graphs.

Why (measured on an H200 with a 3B model, ../shared/notes/gpu.md): the dynamic-cache batch (batching.py)
concatenates every layer's cache each step and re-pads every row on each join or leave, and its eager step
launches ~1,300 kernels for ~10 ms of GPU work, so a step cost 26-95 ms. Here:

- **Slots.** One buffer per layer for keys and one for values, (slots, kv_heads, slot_tokens, head_dim),
  allocated once at start-up from a memory budget (``plan``). The rows decoding are always slots 0..n-1: a
  joiner's prefilled cache is copied into slot n; a leaver's slot is filled by moving the last row into it
  (one row's copy, never the whole batch). Each row's cache starts at position 0 of its slot, so rows need
  no padding; a (rows, 1, 1, length) mask marks each row's filled positions.
- **Per-row writes.** The cache layers write each row's new keys and values at that row's own length with
  one ``scatter_`` per layer, and hand the attention views of the slots cut at a length bucket (powers of
  two from 128), so attention reads what is filled, rounded up, not the whole slot.
- **CUDA graphs.** On CUDA the step (embedding, every layer, the head) is captured once per (batch-size
  bucket, length bucket) over static buffers (token ids, positions, lengths) and replayed; rows past n in
  a bucket are padding over free slots. Eager on CPU, when ``cuda_graphs`` is off, or if a capture fails.
- **Attention kernels.** The step runs SDPA limited to ``sdpa_backends`` (on CUDA: flash and efficient;
  cuDNN builds a new plan for every new sequence length). Models loaded with another attention
  implementation run the prompt with it and the decode step with SDPA.
- **No autograd.** Everything under ``inference_mode``; the parameters are frozen at load.

The prompt itself is prefilled by the model's own ``_prefill`` exactly as ``generate`` does it (vision,
audio, 3-D rope positions; transformers_engine.py), into a DynamicCache that is copied into the slot.
Family specifics reach this file only through ``decoders.DecoderFamily``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache, CacheLayerMixin

from omnigate.errors import DeadlineExceeded, LimitExceeded
from omnigate_worker.engine.base import Batch
from omnigate_worker.engine.batching import Row, end_if_finished, pick_tokens
from omnigate_worker.engine.decoders import CacheGeometry, DecoderFamily
from omnigate_worker.settings import WorkerSettings

if TYPE_CHECKING:
    from omnigate_worker.speech.pipeline import ThinkerTap

log = logging.getLogger(__name__)

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
SMALLEST_LENGTH_BUCKET = 128
MAX_GRAPHS = 96  # (batch, length) buckets captured at most; later shapes run eagerly


def sdpa_backends(setting: str, device: torch.device) -> list[SDPBackend] | None:
    """The SDPA kernels the decode step may use (None: torch's own choice)."""
    if setting == "auto":
        if device.type != "cuda":
            return None
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    names = [name.strip() for name in setting.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise ValueError(
            f"sdpa_backends: unknown {unknown or setting!r}; use auto or some of {', '.join(BACKENDS)}"
        )
    return [BACKENDS[name] for name in names]


# ---- sizing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotPlan:
    slots: int
    slot_tokens: int
    geometry: CacheGeometry

    @property
    def bytes(self) -> int:
        return self.slots * self.slot_tokens * self.geometry.bytes_per_token

    def describe(self) -> str:
        return f"{self.slots} KV slots x {self.slot_tokens} tokens ({self.bytes / 2**30:.2f} GiB)"


def kv_budget_bytes(settings: WorkerSettings, device: torch.device) -> int:
    """Bytes the slots may take: the setting, else what the memory fraction leaves after the weights and
    the activation reserve (CUDA), else a quarter of the machine's memory (CPU)."""
    if settings.kv_cache_bytes:
        return int(settings.kv_cache_bytes)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        used = torch.cuda.memory_allocated(device)
        reserve = settings.activation_reserve_fraction * total
        return max(0, int(settings.kv_cache_memory_fraction * total - used - reserve))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def plan(settings: WorkerSettings, geometry: CacheGeometry, device: torch.device) -> SlotPlan:
    """Slots and slot length from the budget. Raises ValueError when not even one slot fits."""
    budget_tokens = kv_budget_bytes(settings, device) // geometry.bytes_per_token
    need = settings.max_prompt_tokens + settings.max_new_tokens_limit
    if settings.kv_slot_tokens:
        slot_tokens = settings.kv_slot_tokens
    else:
        # As long as a request may be, unless that leaves fewer than max_batch_size slots; never below
        # 512 tokens (or the need) per slot, where the budget allows fewer slots instead.
        slot_tokens = min(need, max(budget_tokens // settings.max_batch_size, min(need, 512)))
    slots = min(settings.max_batch_size, budget_tokens // max(1, slot_tokens))
    if slots < 1:
        raise ValueError(
            f"the KV-cache budget ({budget_tokens} tokens) holds no slot of {slot_tokens} tokens; raise "
            "kv_cache_bytes or kv_cache_memory_fraction, or lower kv_slot_tokens"
        )
    return SlotPlan(slots, slot_tokens, geometry)


# ---- the cache the decoder sees ----------------------------------------------------------------------


class SlotLayer(CacheLayerMixin):
    """One layer's slots. ``update`` writes each row's new keys/values at the row's own length and returns
    the first ``rows`` slots cut at the current length bucket (views: nothing is copied)."""

    is_compileable = True
    keys: torch.Tensor  # preallocated: never None, unlike the base's lazily created tensors
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, view: _StepView) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True
        self._view = view

    def lazy_initialization(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> None:  # pragma: no cover - preallocated
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        view = self._view
        rows, length, first = key_states.shape[0], view.length, view.first
        index = view.write_index(key_states)
        keys, values = self.keys[first : first + rows], self.values[first : first + rows]
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys[:, :, :length], values[:, :, :length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._view.length, 0

    def get_seq_length(self) -> int:
        return self._view.length

    def get_max_length(self) -> int:
        return int(self.keys.shape[2])


class _StepView:
    """What the layers of the step being run share: the rows' lengths (a device buffer) and the bucket."""

    def __init__(self, lengths: torch.Tensor) -> None:
        self.lengths = lengths
        self.length = SMALLEST_LENGTH_BUCKET
        self.first = 0  # the first slot of the rows run (a chunked prefill runs one slot at the top)

    def write_index(self, states: torch.Tensor) -> torch.Tensor:
        rows, heads, count, dim = states.shape
        offsets = torch.arange(count, device=states.device) if count > 1 else None
        index = self.lengths[self.first : self.first + rows].view(rows, 1, 1, 1)
        if offsets is not None:
            index = index + offsets.view(1, 1, count, 1)
        return index.expand(rows, heads, count, dim)


class SlotCache(Cache):
    def __init__(self, layers: list[SlotLayer]) -> None:
        super().__init__(layers=list(layers))


class SlotPool:
    """The preallocated slots and the static per-slot buffers the step reads (ids, positions, lengths)."""

    def __init__(
        self, plan_: SlotPlan, family: DecoderFamily, device: torch.device, position_shape: tuple[int, ...]
    ) -> None:
        g = plan_.geometry
        self.plan = plan_
        self.device = device
        shape = (plan_.slots, g.kv_heads, plan_.slot_tokens, g.head_dim)
        # On CUDA the slots are zeroed once (free memory may hold NaN bit patterns, and a masked NaN still
        # poisons attention: 0 * NaN). On CPU they are zeroed slot by slot as rows reach new lengths, so
        # the reservation costs no memory until used.
        make = torch.zeros if device.type == "cuda" else torch.empty
        self.keys = [make(shape, dtype=g.dtype, device=device) for _ in range(g.layers)]
        self.values = [make(shape, dtype=g.dtype, device=device) for _ in range(g.layers)]
        self.zeroed = [plan_.slot_tokens if device.type == "cuda" else 0] * plan_.slots
        self.ids = torch.zeros((plan_.slots, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((*position_shape, plan_.slots, 1), dtype=torch.long, device=device)
        self.lengths = torch.zeros((plan_.slots,), dtype=torch.long, device=device)
        # A per-slot input vector the family adds to the step's embeddings (the talker: the thinker's reply).
        self.extra = (
            torch.zeros((plan_.slots, 1, family.extra_width), dtype=g.dtype, device=device)
            if family.extra_width
            else None
        )
        self.arange = torch.arange(plan_.slot_tokens, device=device)
        self.view = _StepView(self.lengths)
        self.cache: SlotCache | None = SlotCache(
            [SlotLayer(k, v, self.view) for k, v in zip(self.keys, self.values, strict=True)]
        )
        self.owner: object | None = None
        # (batch, length) -> (graph, (logits, last hidden states)): the graph's static outputs
        self.graphs: dict[
            tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]
        ] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.graph_failures: set[tuple[int, int]] = set()

    @property
    def slots(self) -> int:
        return self.plan.slots

    @property
    def slot_tokens(self) -> int:
        return self.plan.slot_tokens

    def length_bucket(self, tokens: int) -> int:
        bucket = SMALLEST_LENGTH_BUCKET
        while bucket < tokens:
            bucket *= 2
        return min(bucket, self.plan.slot_tokens)

    def ensure_zeroed(self, slot: int, upto: int) -> None:
        done = self.zeroed[slot]
        if done >= upto:
            return
        for tensor in (*self.keys, *self.values):
            tensor[slot, :, done:upto].zero_()
        self.zeroed[slot] = upto

    def move(self, source: int, target: int, length: int) -> None:
        """Moves a row's cache and step buffers from slot ``source`` to slot ``target``."""
        for tensor in (*self.keys, *self.values):
            tensor[target, :, :length].copy_(tensor[source, :, :length])
        self.ids[target] = self.ids[source]
        if self.extra is not None:
            self.extra[target] = self.extra[source]
        self.positions[..., target, :] = self.positions[..., source, :]
        self.lengths[target] = self.lengths[source]
        self.zeroed[target] = max(self.zeroed[target], length)

    def release(self) -> None:
        self.graphs.clear()
        self.keys, self.values = [], []
        self.cache = None


# ---- the batch ---------------------------------------------------------------------------------------


class SlotBatch(Batch):
    """Rows decoding together over the pool's slots (slot i = row i)."""

    def __init__(
        self, family: DecoderFamily, pool: SlotPool, settings: WorkerSettings, eager_attention: bool
    ) -> None:
        self._family = family
        self._pool = pool
        self._backends = sdpa_backends(settings.sdpa_backends, pool.device)
        self._graphs = settings.cuda_graphs and pool.device.type == "cuda"
        self._chunk = settings.prefill_tokens_per_step
        self._eager_attention = eager_attention  # the model runs eager attention: additive float masks
        self.rows: list[Row] = []
        self._prefilling: _Prefill | None = None  # a long prompt being prefilled chunk by chunk

    def __len__(self) -> int:
        return len(self.rows) + (self._prefilling is not None)

    @property
    def length(self) -> int:
        return max((row.cache_len for row in self.rows), default=0)

    def admits(self, prompt_tokens: int, admitted: list[int]) -> bool:
        if len(self) + len(admitted) >= self._pool.slots:
            return False
        if prompt_tokens > self._chunk:  # one long prompt is prefilled in chunks at a time
            return self._prefilling is None and all(tokens <= self._chunk for tokens in admitted)
        return True

    # -- joining -----------------------------------------------------------------------------------

    def add(
        self, row: Row, input_ids: torch.Tensor, kwargs: dict[str, Any], first_logits: torch.Tensor
    ) -> None:
        """Copies a prefilled row's cache into the next free slot and picks its first token."""
        pool = self._pool
        if pool.owner not in (None, self):
            raise RuntimeError("the KV slots belong to another batch")
        if len(self.rows) >= pool.slots:
            raise LimitExceeded("every KV-cache slot is taken", retry_after_s=1.0)
        cache = kwargs["past_key_values"]
        cache_len = int(cache.layers[0].keys.shape[-2])
        if cache_len + row.max_new_tokens > pool.slot_tokens:
            raise LimitExceeded(
                f"the prompt ({cache_len} tokens) plus max_new_tokens ({row.max_new_tokens}) does not fit "
                f"one KV-cache slot ({pool.slot_tokens} tokens)"
            )
        (token,) = pick_tokens([row], first_logits, lambda i: input_ids)
        slot = len(self.rows)
        pool.ensure_zeroed(slot, min(pool.slot_tokens, cache_len))
        for layer, keys, values in zip(cache.layers, pool.keys, pool.values, strict=True):
            keys[slot, :, :cache_len].copy_(layer.keys[0])
            values[slot, :, :cache_len].copy_(layer.values[0])
        pool.ids[slot, 0] = token
        pool.lengths[slot] = cache_len
        pool.positions[..., slot, 0] = self._family.next_positions(kwargs.get("position_ids"), cache_len)
        row.cache_len = cache_len
        pool.owner = self
        self.rows.append(row)

    def add_chunked(
        self, row: Row, input_ids: torch.Tensor, inputs: dict[str, torch.Tensor], chunk: int
    ) -> None:
        """Takes a long prompt's decoder inputs (``decoder_inputs``); its decoder runs ``chunk`` tokens after
        each decode step in the top free slot, and the row joins the decoding rows when its prompt is in."""
        pool = self._pool
        if self._prefilling is not None or len(self) >= pool.slots:
            raise LimitExceeded("no KV-cache slot is free for a prefill", retry_after_s=1.0)
        total = int(inputs["positions"].shape[-1])
        if total + row.max_new_tokens > pool.slot_tokens:
            raise LimitExceeded(
                f"the prompt ({total} tokens) plus max_new_tokens ({row.max_new_tokens}) does not fit one "
                f"KV-cache slot ({pool.slot_tokens} tokens)"
            )
        slot = pool.slots - 1
        pool.ensure_zeroed(slot, total)
        pool.lengths[slot] = 0
        pool.owner = self
        self._prefilling = _Prefill(row, input_ids, inputs, slot, chunk)

    # -- stepping ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every row, then one chunk of a long prompt; finished rows report and leave."""
        self._drop_finished()
        if self.rows:
            self._decode()
        if self._prefilling is not None:
            self._prefill_chunk()

    def _decode(self) -> None:
        while self.rows:
            try:
                logits, hidden = self._forward()
                break
            except torch.OutOfMemoryError:
                # Not the rows before it: the newest row pushed the step over the memory it had. It
                # leaves with RESOURCE_EXHAUSTED and the step is retried (the rows' cache writes are
                # idempotent: same token, same position).
                self._evict_newest()
        else:
            return
        self._tap(hidden)
        tokens = pick_tokens(self.rows, logits, self._history)
        self._advance(tokens)
        self._drop_finished()

    def _tap(self, hidden: torch.Tensor) -> None:
        """Hands speech rows the step's last hidden state plus the embedding of the token it was fed (what
        the talker takes from the thinker per reply token), before the graph's buffers are reused."""
        tapped = [i for i, row in enumerate(self.rows) if row.speech is not None]
        if not tapped:
            return
        index = torch.tensor(tapped, device=hidden.device)
        vectors = hidden.index_select(0, index) + self._family.embed(self._pool.ids[index, 0])
        for n, i in enumerate(tapped):
            row = self.rows[i]
            cast("ThinkerTap", row.speech).fed(vectors[n], row.tokens[-1])  # a text row's speech: its tap

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self._pool
        rows = len(self.rows)
        length = pool.length_bucket(max(row.cache_len for row in self.rows) + 1)
        if pool.device.type != "cuda":
            for slot in range(rows):
                pool.ensure_zeroed(slot, length)
        width = _batch_bucket(rows, pool.slots) if self._graphs else rows
        key = (width, length)
        if self._graphs and key not in pool.graph_failures:
            if key in pool.graphs or len(pool.graphs) < MAX_GRAPHS:
                outputs = self._replay(key)
                if outputs is not None:
                    return outputs[0][:rows], outputs[1][:rows]
        logits, hidden = self._run(width, length)
        return logits[:rows], hidden[:rows]

    def _prefill_chunk(self) -> None:
        job = self._prefilling
        assert job is not None  # step() runs this only while a prompt is being prefilled
        row, pool = job.row, self._pool
        if row.cancelled.is_set() or (row.deadline is not None and time.monotonic() > row.deadline):
            self._end_prefill()
            row.done(None if row.cancelled.is_set() else DeadlineExceeded("the request's deadline passed"))
            return
        start = job.done
        end = min(start + job.chunk, job.total)
        length = pool.length_bucket(end)
        if pool.device.type != "cuda":
            pool.ensure_zeroed(job.slot, length)
        query = torch.arange(start, end, device=pool.device).view(-1, 1)
        mask = (pool.arange[:length].view(1, length) <= query).view(1, 1, end - start, length)
        if self._eager_attention:
            dtype = pool.plan.geometry.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        inputs = job.inputs
        feed = (
            {"inputs_embeds": inputs["embeds"][:, start:end]}
            if "embeds" in inputs
            else {"input_ids": inputs["ids"][:, start:end]}
        )
        pool.view.first, pool.view.length = job.slot, length
        decoder = self._family.decoder
        assert decoder is not None  # the runner serves only families it supports (DecoderFamily.unsupported)
        try:
            with self._kernels():
                out = decoder(
                    **feed,
                    position_ids=inputs["positions"][..., start:end],
                    attention_mask=mask,
                    past_key_values=pool.cache,
                    use_cache=True,
                )
        except torch.OutOfMemoryError:
            self._end_prefill()
            row.done(
                LimitExceeded(
                    "the worker ran out of memory for this request's prompt; retry later or send less input",
                    retry_after_s=5.0,
                )
            )
            return
        finally:
            pool.view.first = 0
        pool.lengths[job.slot] = end
        job.done = end
        if row.speech is not None:
            cast("ThinkerTap", row.speech).add_prompt_hidden(out.last_hidden_state)  # a text row's: its tap
        if end < job.total:
            return
        logits = self._family.logits(out.last_hidden_state)
        self._end_prefill()
        (token,) = pick_tokens([row], logits, lambda i: job.input_ids)
        slot = len(self.rows)
        if slot != job.slot:
            pool.move(job.slot, slot, end)
            pool.lengths[job.slot] = 0
        pool.ids[slot, 0] = token
        pool.lengths[slot] = end
        pool.positions[..., slot, 0] = inputs["positions"][..., 0, -1] + 1
        row.cache_len = end
        pool.owner = self
        self.rows.append(row)
        self._drop_finished()

    def _end_prefill(self) -> None:
        job, self._prefilling = self._prefilling, None
        assert job is not None  # called only while a prompt is being prefilled
        self._pool.lengths[job.slot] = 0
        if not self.rows:
            self._pool.owner = None

    def _run(self, width: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward over slots [0, width) with attention cut at ``length`` (graph-capturable)."""
        pool = self._pool
        pool.view.length = length
        visible = pool.arange[:length].view(1, length) <= pool.lengths[:width].view(width, 1)
        mask = visible.view(width, 1, 1, length)
        if self._eager_attention:
            dtype = pool.plan.geometry.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        decoder = self._family.decoder
        assert decoder is not None  # the runner serves only families it supports (DecoderFamily.unsupported)
        with self._kernels():
            out = decoder(
                **self._family.step_inputs(pool, width),
                position_ids=pool.positions[..., :width, :],
                attention_mask=mask,
                past_key_values=pool.cache,
                use_cache=True,
            )
            hidden = out.last_hidden_state[:, -1]
            return self._family.logits(out.last_hidden_state), hidden

    @contextlib.contextmanager
    def _kernels(self) -> Iterator[None]:
        config = self._family.config
        assert config is not None  # the runner serves only families it supports (DecoderFamily.unsupported)
        implementation = config._attn_implementation
        swap = implementation not in ("sdpa", "eager")
        if swap:  # e.g. flash_attention_2 for the prompt: the slot step's masks are SDPA's
            config._attn_implementation_internal = "sdpa"
        try:
            with sdpa_kernel(self._backends) if self._backends else contextlib.nullcontext():
                yield
        finally:
            if swap:
                config._attn_implementation_internal = implementation

    def _replay(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        pool = self._pool
        entry = pool.graphs.get(key)
        if entry is None:
            entry = self._capture(key)
            if entry is None:
                return None
        graph, outputs = entry
        pool.view.length = key[1]
        graph.replay()
        return outputs

    def _capture(
        self, key: tuple[int, int]
    ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]] | None:
        pool = self._pool
        width, length = key
        try:
            stream = torch.cuda.Stream(device=pool.device)
            stream.wait_stream(torch.cuda.current_stream(pool.device))
            with torch.cuda.stream(stream):
                self._run(width, length)  # warms up kernels and workspaces outside the capture
            torch.cuda.current_stream(pool.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool.graph_pool):
                outputs = self._run(width, length)
        except Exception:  # noqa: BLE001 - the step runs eagerly for this shape instead
            log.warning(
                "CUDA graph capture failed for batch %d, length %d; eager for it",
                width,
                length,
                exc_info=True,
            )
            pool.graph_failures.add(key)
            return None
        pool.graphs[key] = (graph, outputs)
        log.info(
            "captured the decode step for batch %d, length %d (%d graphs)", width, length, len(pool.graphs)
        )
        return pool.graphs[key]

    def _history(self, i: int) -> torch.Tensor:
        return torch.tensor([self.rows[i].tokens], dtype=torch.long, device=self._pool.device)

    def _advance(self, tokens: list[int]) -> None:
        pool = self._pool
        rows = len(self.rows)
        pool.ids[:rows, 0].copy_(torch.tensor(tokens, dtype=torch.long), non_blocking=True)
        pool.lengths[:rows] += 1
        pool.positions[..., :rows, :] += 1
        for row in self.rows:
            row.cache_len += 1

    # -- leaving -----------------------------------------------------------------------------------

    def _drop_finished(self) -> None:
        for i in reversed(range(len(self.rows))):
            if end_if_finished(self.rows[i]):
                self._remove(i)

    def _remove(self, i: int) -> None:
        last = len(self.rows) - 1
        if i != last:
            moved = self.rows[last]
            self._pool.move(last, i, moved.cache_len)
            self.rows[i] = moved
        self.rows.pop()
        # A free slot is graph padding: it writes at its length, which must stay inside the slot.
        self._pool.lengths[last] = 0
        if not self.rows and self._prefilling is None:
            self._pool.owner = None

    def _evict_newest(self) -> None:
        row = self.rows[-1]
        log.warning("a decode step ran out of memory; the newest of %d rows leaves", len(self.rows))
        if self._pool.device.type == "cuda":
            torch.cuda.empty_cache()
        self._remove(len(self.rows) - 1)
        row.done(
            LimitExceeded(
                "the worker ran out of memory for this request; retry later or send less input",
                retry_after_s=5.0,
            )
        )

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors carried from one step to the next (slots, ids, positions, lengths, graph outputs)."""
        pool = self._pool
        outputs = [tensor for _, pair in pool.graphs.values() for tensor in pair]
        extra = [pool.extra] if pool.extra is not None else []
        return [*pool.keys, *pool.values, pool.ids, pool.positions, pool.lengths, *extra, *outputs]

    def fail_all(self, error: BaseException) -> None:
        rows, self.rows = self.rows, []
        if self._prefilling is not None:
            rows.append(self._prefilling.row)
            self._end_prefill()
        self._pool.owner = None
        for row in rows:
            row.done(error)


@dataclass
class _Prefill:
    """A long prompt being prefilled into ``slot``, ``chunk`` tokens per decode step."""

    row: Row
    input_ids: torch.Tensor
    inputs: dict[str, torch.Tensor]  # embeds (1, L, hidden) or ids (1, L); positions (..., 1, L)
    slot: int
    chunk: int
    done: int = 0

    @property
    def total(self) -> int:
        return int(self.inputs["positions"].shape[-1])


class _DecoderInputs(Exception):
    """Raised by the hook in ``decoder_inputs`` once it has what the text decoder was given."""


def decoder_inputs(family: DecoderFamily, prefill: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Runs ``prefill`` (the model's own forward over the prompt) up to its text decoder and returns what the
    decoder would have been given: the prompt's embeddings (media features merged in, by the model's own
    code) or its ids, and its positions (Qwen-Omni: the multimodal rope positions; else 0..L-1)."""
    seen: dict[str, Any] = {}

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.update(kwargs)
        raise _DecoderInputs

    assert family.decoder is not None and family.head is not None  # a supported family (unsupported())
    handle = family.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        prefill()
    except _DecoderInputs:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the model's forward did not reach its text decoder")
    embeds, ids = seen.get("inputs_embeds"), seen.get("input_ids")
    given = embeds if embeds is not None else ids
    assert given is not None  # a decoder is given its prompt's embeddings or its ids
    out = {"embeds" if embeds is not None else "ids": given}
    length = int(given.shape[1])
    positions = seen.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=family.head.weight.device).view(1, length)
    out["positions"] = positions
    return out


def _batch_bucket(rows: int, slots: int) -> int:
    """Graph batch sizes: powers of two (1, 2, 4, ... 64, ...), never above the slot count."""
    return min(1 << max(0, rows - 1).bit_length(), slots)
