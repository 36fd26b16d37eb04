"""``GET /v1/models`` (the one model this gateway serves) and ``GET /v1/models/{id}``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from omnigate.errors import quote
from omnigate_gateway.openai_api.dependencies import Core, Settings, call_for, served_model
from omnigate_gateway.openai_api.errors import NotFound
from omnigate_gateway.openai_api.requests import model_matches
from omnigate_gateway.openai_api.responses import model_object

router = APIRouter()


# GET routes take HEAD too: uvicorn sends the same status and headers without the body.
@router.api_route("/v1/models", methods=["GET", "HEAD"], response_model=None)
async def list_models(request: Request, core: Core, settings: Settings) -> dict:
    info = core.public_model_info(call_for(request, settings, "GetModelInfo", streamed=False))
    return {"object": "list", "data": [model_object(info.model_id, request.app.state.started)]}


@router.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"], response_model=None)
async def get_model(model: str, request: Request, core: Core, settings: Settings) -> dict:
    served_model(core, model)  # an unknown model is refused here (and logged as such), not after the core
    info = core.public_model_info(call_for(request, settings, "GetModelInfo", streamed=False))
    if not model_matches(model, info.model_id):
        raise NotFound(
            f"The model {quote(model)} does not exist or you do not have access to it", param="model"
        )
    return model_object(info.model_id, request.app.state.started)
