"""POST /tokenize, POST /detokenize."""
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .. import requests as rq
from ..body import read_json
from ..requests import ApiError
from . import check_model, state_of

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request):
    state = state_of(request)
    body = await read_json(request, state.config)
    check_model(state, body)
    text = body.get("prompt", body.get("text"))
    if not isinstance(text, str):
        raise ApiError(400, "prompt: must be a string", param="prompt", code="invalid_value")
    try:
        ids = await run_in_threadpool(state.enc.encode, text)  # a long text: off the event loop
    except ValueError as e:
        raise rq.bad("prompt", str(e)) from None
    return {"tokens": ids, "count": len(ids), "max_model_len": state.hparams.n_ctx}


@router.post("/detokenize")
async def detokenize(request: Request):
    state = state_of(request)
    body = await read_json(request, state.config)
    check_model(state, body)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ApiError(400, "tokens: must be a list of token ids", param="tokens", code="invalid_value")
    n = len(state.enc)
    for t in ids:
        if not 0 <= t < n:
            raise rq.bad("tokens", f"token id {t} is outside the vocabulary (0..{n - 1})")
    return {"prompt": state.enc.decode(ids)}
