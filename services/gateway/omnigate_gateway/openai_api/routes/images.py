"""``POST /v1/images/generations`` for image-output models (one image, as base64 PNG, JPEG or WebP)."""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, Request

from omnigate.errors import InternalError
from omnigate_gateway.openai_api.dependencies import Core, Settings, call_for, served_model
from omnigate_gateway.openai_api.encoding import image_result
from omnigate_gateway.openai_api.protocol import ImageGenerationRequest
from omnigate_gateway.openai_api.requests import image_request
from omnigate_gateway.openai_api.streaming import collect, until_disconnect

router = APIRouter()


@router.post("/v1/images/generations", response_model=None)
async def images_generations(
    body: ImageGenerationRequest, request: Request, core: Core, settings: Settings
) -> dict:
    proto, output_format, size = image_request(body)
    served_model(core, body.model)
    call = call_for(request, settings, "Generate", streamed=False)
    collected, _ = await until_disconnect(request, collect(core.generate(proto, call)))
    images = [e.image for e in collected if e.WhichOneof("event") == "image"]
    if not images:
        raise InternalError("the model returned no image")
    data, width, height = await asyncio.to_thread(image_result, images[0], output_format, size)
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(data).decode(), "revised_prompt": None}],
        "output_format": output_format,
        "size": f"{width}x{height}",
    }
