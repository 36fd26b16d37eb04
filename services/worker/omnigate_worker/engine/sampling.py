"""A request's generation parameters as transformers takes them: the one mapping, used by ``generate``
(one request at a time) and by the batched decode loop (its logits processors come from the same
``GenerationConfig`` ``generate`` would build)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from transformers import GenerationConfig

from omnigate.conversation import GenerationParams

if TYPE_CHECKING:
    from transformers._typing import GenerativePreTrainedModel


def generate_kwargs(params: GenerationParams) -> dict[str, Any]:
    """``generate()`` keyword arguments for the request's sampling (not its length: callers add that)."""
    kwargs: dict[str, Any] = {"do_sample": params.do_sample}
    if params.do_sample:
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(params, name)
            if value is not None:
                kwargs[name] = value
    else:
        # Greedy: neutralise sampling defaults a checkpoint's generation_config may carry.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if params.repetition_penalty is not None:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.min_new_tokens:
        kwargs["min_new_tokens"] = params.min_new_tokens
    return kwargs


def generation_config(model: GenerativePreTrainedModel, params: GenerationParams) -> GenerationConfig:
    """The ``GenerationConfig`` ``model.generate()`` would use for this request (checkpoint defaults, then
    the request), a copy the caller may keep."""
    config, _ = model._prepare_generation_config(
        None, max_new_tokens=params.max_new_tokens, **generate_kwargs(params)
    )
    config = copy.deepcopy(config)
    config.guidance_scale = None  # text mode; generate() does the same for Janus
    return config
