"""POST /v1/embeddings: the vectors of gpt2-transform.py, in least-padding batches, on the server's forward
worker (below decoding's priority), which stops between batches when the request times out, the client
hangs up or the server shuts down."""
import base64
import time

import numpy as np
from fastapi import APIRouter, Request

from tasks.errors import OptionError
from tasks.serving import vector_batches

from .. import requests as rq
from ..body import read_json
from ..responses import json_response
from ..state import Channel
from . import check_model, state_of

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    from tasks.vectors import Vectorizer

    state = state_of(request)
    t0 = time.monotonic()
    body = await read_json(request, state.config)
    hp = state.hparams
    check_model(state, body)
    items = rq.texts_or_tokens(body, "input", hp.n_vocab)
    fmt = rq.choice(body, "encoding_format", "float", ("float", "base64"))
    pooling = rq.choice(body, "pooling", "last", ("last", "mean"))
    layer = rq.integer(body, "layer", -1)
    normalize = rq.boolean(body, "normalize", False)
    if body.get("dimensions") is not None and body["dimensions"] != hp.n_embd:
        raise rq.bad("dimensions", f"this model's vectors have {hp.n_embd} dimensions")
    try:
        vec = Vectorizer(state.model, state.enc, pooling=pooling, layer=layer, normalize=normalize)
    except OptionError as e:
        raise rq.bad(e.option, e.reason) from None
    channel = Channel(state, t0 + state.config.timeout, request.receive)

    def compute(cancelled):
        # long texts are encoded in the encoder's own process (state.encoder_pool: off this process's
        # lock, so that decoding keeps its pace); it stops as soon as the request ends
        texts = [item for item in items if isinstance(item, str)]
        try:
            encoded = state.encoder_pool.encode_many(texts, cancelled, arrays=True)
        except ValueError as e:
            raise rq.bad("input", str(e)) from None
        if encoded is None:
            return None
        encoded = iter(encoded)
        id_lists = []
        for item in items:  # as Vectorizer.ids: empty -> <|endoftext|>, the last n_ctx tokens
            ids = next(encoded)[-hp.n_ctx:] if isinstance(item, str) else list(item)[-hp.n_ctx:]
            id_lists.append(ids if len(ids) else [state.enc.eos_id])
        out = np.empty((len(id_lists), hp.n_embd), np.float32)

        def forward(cancelled):  # on the server's forward worker (state.ForwardWorker)
            for rows in vector_batches([len(ids) for ids in id_lists], vec.max_tokens, vec.max_batch):
                if cancelled.is_set():
                    return None
                out[rows] = vec.batch_vectors([id_lists[i] for i in rows])
            return out

        if state.forward.run(forward, channel.until, cancelled) is None:
            return None
        return out, sum(len(ids) for ids in id_lists)

    try:
        vectors, tokens = await channel.in_worker(compute)
    finally:
        channel.close()
    data = []
    for i, v in enumerate(vectors):
        if fmt == "base64":
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        else:
            emb = v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return json_response({"object": "list", "data": data, "model": state.config.model_name,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
