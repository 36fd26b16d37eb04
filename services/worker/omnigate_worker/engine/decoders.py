"""What the slot runner needs to know about a model family, and nothing more.

The runner (slots.py) drives a model's text decoder one token at a time over its own KV-cache slots. It
needs, per family: the decoder module and the head that turns its last hidden state into logits, the cache
geometry (layers, KV heads, head size), whether the decoder can take an explicit 4-D attention mask and
explicit positions for every layer, and where the next token's positions come from after the prefill.

``generate``'s own prefill (the model's full forward, with its vision, audio and 3-D rope code) stays in
charge of the prompt, so family specifics such as Qwen-Omni's thinker and its multimodal rope positions
reach the runner only as the carried ``position_ids``: (B, L) for 1-D rope, (3 or 4, B, L) for
Qwen-VL-style rope. After a prompt the next token's positions are the carried ones' last column (its
``_update_model_kwargs_for_generation`` already moved them one on), and every further token adds one in each
rope dimension: text after the prompt advances all dimensions together, whatever the family.

Families the runner cannot serve exactly (sliding-window or linear-attention layers, a logit soft-cap or
scale applied outside the head) say why, and the engine falls back to the dynamic-cache batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from omnigate_worker.engine.slots import SlotPool


@dataclass(frozen=True)
class CacheGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


class DecoderFamily:
    """A causal text decoder with full attention in every layer (Qwen2/2.5/3, Llama, Qwen-Omni's thinker,
    Janus's language model, Qwen2-Audio's). Subclass and register for a family that differs."""

    extra_width: int | None = None  # a per-slot input vector added to the step's embeddings (talker)

    # ``gen_model`` is a transformers model (Any: what the runner reads of it is family-specific). Its
    # decoder, head and config are None only where ``unsupported`` says why; the runner never sees those.
    def __init__(self, gen_model: Any) -> None:
        self.gen = gen_model
        self.decoder = gen_model.get_decoder() if hasattr(gen_model, "get_decoder") else None
        self.head = gen_model.get_output_embeddings() if hasattr(gen_model, "get_output_embeddings") else None
        self.config = getattr(self.decoder, "config", None)

    def unsupported(self) -> str | None:
        """Why the slot runner cannot run this model exactly (None: it can)."""
        if self.decoder is None or self.head is None or self.config is None:
            return "the model exposes no text decoder and output head (get_decoder / get_output_embeddings)"
        if self.decoder is self.gen:
            return "the model is its own decoder (no separate head)"
        config = self.config
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            return f"its decoder has {', '.join(sorted(kinds - {'full_attention'}))} layers"
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
            return "its decoder uses sliding-window attention"
        for name in ("final_logit_softcapping", "logit_scale", "attn_logit_softcapping"):
            if getattr(config, name, None) not in (None, 0, 1.0):
                return f"its config sets {name}, applied outside the decoder"
        if not all(hasattr(config, name) for name in ("num_hidden_layers", "num_attention_heads")):
            return "its decoder config has no layer or head counts"
        if len(getattr(self.decoder, "layers", ())) != config.num_hidden_layers:
            return "its decoder's layers are not the config's num_hidden_layers"
        return None

    def geometry(self, dtype: torch.dtype) -> CacheGeometry:
        config = self.config
        assert config is not None, self.unsupported()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return CacheGeometry(config.num_hidden_layers, kv_heads, head_dim, dtype)

    def position_shape(self, carried: torch.Tensor | None) -> tuple[int, ...]:
        """Leading dimensions of the positions the decoder takes: () for 1-D rope, (P,) for P-row rope."""
        if carried is None or carried.dim() == 2:
            return ()
        return (int(carried.shape[0]),)

    def next_positions(self, carried: torch.Tensor | None, cache_len: int) -> torch.Tensor:
        """Positions of the first token fed after the prompt, shaped (*position_shape,)."""
        if carried is None:
            return torch.tensor(cache_len)
        return carried[..., 0, -1]

    def step_inputs(self, pool: SlotPool, width: int) -> dict[str, Any]:
        """The decode step's input for slots [0, width) (graph-capturable: reads the pool's buffers)."""
        return {"input_ids": pool.ids[:width]}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of ``ids`` (what the decoder's first layer is given for them)."""
        return self.gen.get_input_embeddings()(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the last position of each row, in float32."""
        assert self.head is not None, self.unsupported()
        return self.head(hidden[:, -1]).float()


FAMILIES: dict[str, type[DecoderFamily]] = {}


def decoder_for(gen_model: Any) -> DecoderFamily:
    return FAMILIES.get(type(gen_model).__name__, DecoderFamily)(gen_model)
