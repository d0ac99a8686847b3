"""GET /v1/models (the one model the mesh serves) and GET /health (open, like gRPC health)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from moemesh.errors import MoemeshError

from .door import Door
from .protocol import ModelCard, ModelList


def routes(door: Door) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models", dependencies=[Depends(door.caller)])
    async def list_models() -> ModelList:
        name, info = await door.model(None)
        return ModelList(data=[ModelCard(id=name, max_model_len=info.max_position_embeddings or None)])

    @api.get("/health")
    async def health() -> JSONResponse:
        """200 once the router is connected to etcd and an attention node is ready; 503 otherwise."""
        try:
            ready = bool(await door.path.ranked())
        except MoemeshError as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        if not ready:
            return JSONResponse({"status": "unavailable", "reason": "no attention node is ready"}, status_code=503)
        return JSONResponse({"status": "ok"})

    return api
