"""GET /health, GET /v1/models, GET /metrics."""
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from . import state_of

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state = state_of(request)
    engine = state.engine
    if engine.failure is not None:
        return JSONResponse({"status": "error", "error": repr(engine.failure)}, status_code=503)
    if state.stop_by is not None:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return {"status": "ok", "model": state.config.model_name, "queue": engine.queue_length,
            "rows": engine.active_rows, "held": engine.held_rows}


@router.get("/v1/models")
async def models(request: Request):
    state = state_of(request)
    return {"object": "list", "data": [
        {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "gpt2-japanese",
         "max_model_len": state.hparams.n_ctx}]}


@router.get("/metrics")
async def prometheus(request: Request):
    body, content_type = state_of(request).metrics.render()
    return Response(body, media_type=content_type)
