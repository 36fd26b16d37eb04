"""The talker stage: Qwen2.5-Omni's talker decoding every speech request's codec codes in one batch.

The talker is a small causal decoder over its own codec vocabulary. ``Qwen2_5OmniForConditionalGeneration
.generate`` (transformers 5.23) runs it after the whole text answer, one request at a time; here it runs
over KV-cache slots with the text batch's machinery (slots.py: per-row writes, length buckets, CUDA graphs)
and starts as soon as the thinker has fed its first reply token:

- **Its prompt** is what ``generate`` builds (``talker_prompt``): the thinker's prompt hidden states plus
  its prompt embeddings (media positions zeroed), the speaker's text-start embedding and the first reply
  token's hidden state plus embedding; codec ids ``[mask] * L, pad, bos``; rope positions from the
  talker's own ``get_rope_index`` over the thinker's prompt ids. It is prefilled by the talker's own forward.
- **Each step** feeds ``codec_embedding(last code) + reply[k]`` through ``thinker_to_talker_proj``, where
  ``reply[k]`` is the thinker's k-th reply vector, then the text end embedding, then the pad embedding for
  ever (``generate``'s ``thinker_reply_part`` after its end-of-text rewrite). ``TalkerFamily.step_inputs``
  computes that inside the captured step from the pool's ``extra`` buffer, which holds each row's
  ``reply[k]``.
- **A row waits** (holds its slot without advancing) while its thinker has not yet fed the reply token the
  next step needs; its cache write that step lands where its next real write goes, so holding is exact.
- Codes are chosen by the talker's own logits processors (``generate``'s ``talker_*`` defaults: sampling
  with top-k 40, top-p 0.8, temperature 0.9, repetition penalty 1.05, the codec start code suppressed; or
  greedy with ``talker_do_sample=false``) and stop at the codec end codes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import LogitsProcessorList
from transformers.cache_utils import DynamicCache

from omnigate.conversation import GenerationRequest
from omnigate.errors import DeadlineExceeded
from omnigate_worker.engine.batching import Cancelled, Done, Row, pick_tokens
from omnigate_worker.engine.decoders import DecoderFamily
from omnigate_worker.engine.slots import SlotBatch, SlotPool

if TYPE_CHECKING:
    from omnigate_worker.speech.pipeline import TalkerFeed, ThinkerTap

log = logging.getLogger(__name__)

# Qwen2.5-Omni generate()'s talker defaults (talker_* keyword arguments, transformers 5.23).
TALKER_SAMPLING = {"top_k": 40, "top_p": 0.8, "temperature": 0.9, "repetition_penalty": 1.05}
TALKER_STOP_CODES = (8292, 8294)  # talker_eos_token_id


class TalkerFamily(DecoderFamily):
    """Qwen2.5-Omni's talker as the slot runner sees it: its decoder, its codec head, and a step input
    that mixes the last code with the thinker's reply vector."""

    def __init__(self, talker: Any) -> None:
        self.gen = talker
        self.decoder = talker.model
        self.head = talker.codec_head
        self.config = talker.model.config
        self.extra_width = int(talker.config.embedding_size)

    def step_inputs(self, pool: SlotPool, width: int) -> dict[str, Any]:
        talker = self.gen
        assert pool.extra is not None  # the pool of a family with extra_width
        embeds = talker.get_input_embeddings()(pool.ids[:width]) + pool.extra[:width]
        return {"inputs_embeds": talker.thinker_to_talker_proj(embeds)}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - the talker feeds no talker
        raise NotImplementedError


class TalkerBatch(SlotBatch):
    """Speech requests' talker rows decoding together. A row's ``speech`` is its ``speech.TalkerFeed``."""

    def _decode(self) -> None:
        while self.rows:
            vectors = [_feed(row).next_vector() for row in self.rows]
            ready = [i for i, vector in enumerate(vectors) if vector is not None]
            if not ready:
                return
            extra = self._pool.extra
            assert extra is not None  # the talker family's pool has its extra buffer
            if len(ready) == len(self.rows):
                extra[: len(ready), 0].copy_(torch.stack(cast("list[torch.Tensor]", vectors)))  # all ready
            else:
                for i in ready:
                    extra[i, 0].copy_(cast(torch.Tensor, vectors[i]))
            try:
                logits, _ = self._forward()
                break
            except torch.OutOfMemoryError:
                self._evict_newest()
        else:
            return
        rows = [self.rows[i] for i in ready]
        if len(ready) < len(self.rows):
            logits = logits[ready]
        tokens = pick_tokens(rows, logits, lambda n: self._history(ready[n]))
        self._advance_rows(ready, tokens)
        for row in rows:
            _feed(row).consumed()
        self._drop_finished()

    def _advance_rows(self, ready: list[int], tokens: list[int]) -> None:
        if len(ready) == len(self.rows):
            self._advance(tokens)
            return
        pool = self._pool
        index = torch.tensor(ready, dtype=torch.long, device=pool.device)
        pool.ids[index, 0] = torch.tensor(tokens, dtype=torch.long, device=pool.device)
        pool.lengths[index] += 1
        pool.positions[..., index, :] += 1
        for i in ready:
            self.rows[i].cache_len += 1

    def _drop_finished(self) -> None:
        for i in reversed(range(len(self.rows))):
            row = self.rows[i]
            if row.cancelled.is_set():
                error = None
            elif row.finished_reason == "deadline":
                error = DeadlineExceeded("the request's deadline passed while its speech was generated")
            elif row.finished_reason is not None:
                error = None
            else:
                continue
            self._remove(i)
            row.done(error)

    def _history(self, i: int) -> torch.Tensor:
        return _feed(self.rows[i]).history(self._pool.device)


def _feed(row: Row) -> TalkerFeed:
    """A talker row's speech: its TalkerFeed (start_talker sets it before the row joins)."""
    return cast("TalkerFeed", row.speech)


class _CodeSink:
    """The talker row's 'streamer': each chosen code goes to the request's speech stream."""

    def __init__(self, on_code: Callable[[int], None]) -> None:
        self._on_code = on_code

    def put(self, value: torch.Tensor) -> None:
        self._on_code(int(value.reshape(-1)[0]))

    def end(self) -> None:  # pragma: no cover - talker rows end through TalkerBatch._drop_finished
        pass


def talker_prompt(model: Any, tap: ThinkerTap, speaker: str) -> dict[str, torch.Tensor]:
    """The talker's prompt for a request, as ``generate`` builds it (transformers 5.23), from the thinker's
    prompt, its prompt hidden states and embeddings (``tap``) and its first reply vector."""
    thinker_config = model.config.thinker_config
    talker = model.talker
    input_ids = tap.input_ids  # (1, L)
    device = input_ids.device
    assert tap.prompt_embeds is not None  # dropped only once this prompt is built
    embeds = tap.prompt_embeds.clone()  # (1, L, H): media positions zeroed, as generate() does
    for present, token in (
        (tap.has_audio, thinker_config.audio_token_index),
        (tap.has_images, thinker_config.image_token_index),
        (tap.has_videos, thinker_config.video_token_index),
    ):
        if present:
            embeds[input_ids == token] = 0
    thinker_embed = model.thinker.get_input_embeddings()
    bos = model.speaker_map[speaker]["bos_token"]
    text_bos = thinker_embed(torch.tensor([[bos]], device=device))
    first = tap.reply[0].view(1, 1, -1)
    inputs_embeds = torch.cat([tap.prompt_hidden + embeds, text_bos, first], dim=1)
    text_ids = torch.cat(
        [input_ids, torch.tensor([[bos, tap.first_token]], dtype=torch.long, device=device)], dim=1
    )
    length = int(input_ids.shape[1])
    codec_ids = torch.cat(
        [
            torch.full((1, length), talker.codec_mask_token, dtype=torch.long, device=device),
            torch.tensor([[talker.codec_pad_token, talker.codec_bos_token]], dtype=torch.long, device=device),
        ],
        dim=1,
    )
    return {"inputs_embeds": inputs_embeds, "input_text_ids": text_ids, "input_ids": codec_ids}


def talker_generation_config(talker: Any, max_new_tokens: int, do_sample: bool) -> Any:
    """The GenerationConfig ``generate`` gives the talker (its talker_* defaults)."""
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "eos_token_id": list(TALKER_STOP_CODES),
        "pad_token_id": talker.codec_pad_token,
        "repetition_penalty": TALKER_SAMPLING["repetition_penalty"],
        "suppress_tokens": [talker.codec_bos_token],
    }
    if do_sample:
        kwargs.update({k: v for k, v in TALKER_SAMPLING.items() if k != "repetition_penalty"})
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    config, _ = talker._prepare_generation_config(None, **kwargs)
    return config


@torch.inference_mode()
def start_talker(
    model: Any,
    batch: TalkerBatch,
    tap: ThinkerTap,
    feed: TalkerFeed,
    *,
    speaker: str,
    max_new_tokens: int,
    do_sample: bool,
    generator: torch.Generator | None,
    rope_inputs: dict[str, Any],
    done: Done,
    cancelled: Cancelled,
    deadline: float | None,
    request: GenerationRequest,
) -> None:
    """Prefills a request's talker with its own forward and adds the row to ``batch``."""
    talker = model.talker
    prompt = talker_prompt(model, tap, speaker)
    codec_ids = prompt["input_ids"]
    length = int(codec_ids.shape[1])
    cache = DynamicCache(config=talker.config)
    outputs = talker(
        inputs_embeds=prompt["inputs_embeds"],
        input_text_ids=prompt["input_text_ids"],
        attention_mask=torch.ones((1, length), dtype=torch.long, device=codec_ids.device),
        past_key_values=cache,
        use_cache=True,
        **rope_inputs,
    )
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
    # generate()'s next positions: the cache length plus the rope delta the prefill just computed.
    position = talker.rope_deltas.reshape(-1)[0] + length
    positions = position.view(1, 1, 1).expand(3, 1, 1).to(torch.long)
    del outputs
    config = talker_generation_config(talker, max_new_tokens, do_sample)
    row = Row(
        request=request,
        emit=lambda event: None,
        done=done,
        cancelled=cancelled,
        deadline=deadline,
        tokens=codec_ids[0].tolist(),
        prompt_len=length,
        max_new_tokens=max_new_tokens,
        eos=set(TALKER_STOP_CODES),
        processors=talker._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=length,
            encoder_input_ids=codec_ids,
            prefix_allowed_tokens_fn=None,
            logits_processor=LogitsProcessorList(),
            device=codec_ids.device,
            model_kwargs={},
        ),
        do_sample=do_sample,
        generator=generator,
        text=None,
        streamer=_CodeSink(feed.on_code),
        started=0.0,
    )
    row.speech = feed
    feed.bind(row)
    batch.add(row, codec_ids, {"past_key_values": cache, "position_ids": positions}, logits)
