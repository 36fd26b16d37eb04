"""Janus-style image generators (``JanusForConditionalGeneration``): image and text in, text or an image out.

transformers 5.23: the pipeline's image postprocess fails ("PIL.Image.Image is not a valid TensorType"), so
image tokens are decoded here with ``decode_image_tokens`` and postprocessed by the image processor; image
generation takes no stopping criteria, so a cancelled request is dropped when its image is done. The
prompt gets the begin-of-image token from the processor (``inputs.processor_kwargs``: generation_mode).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import PIL.Image

from omnigate.conversation import GenerationRequest, ImageOutput
from omnigate.errors import InvalidInput
from omnigate_worker.families.generic import GenericFamily


class JanusFamily(GenericFamily):
    architectures = ("JanusForConditionalGeneration",)

    @classmethod
    def matches(cls, model: Any) -> bool:
        return super().matches(model) or hasattr(model, "decode_image_tokens")

    def generate_image(
        self, inputs: Any, request: GenerationRequest, sampling: dict[str, Any]
    ) -> tuple[object, ImageOutput]:
        model = self.model
        if not hasattr(model, "decode_image_tokens"):  # pragma: no cover - matched by it
            raise InvalidInput(f"{type(model).__name__} has no image decoder")
        tokens = model.generate(**inputs, generation_mode="image", **sampling)
        decoded = model.decode_image_tokens(tokens)
        processed = self.processor.image_processor.postprocess(list(decoded.float()), return_tensors="pt")
        pixels = processed["pixel_values"][0].permute(1, 2, 0).cpu().numpy().astype(np.uint8)
        picture = PIL.Image.fromarray(pixels, mode="RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return tokens, ImageOutput(
            data=buffer.getvalue(), mime_type="image/png", width=picture.width, height=picture.height
        )
