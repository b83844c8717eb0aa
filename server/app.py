"""The OpenAI-compatible HTTP API over one model, one Engine and the tasks of tasks/.

Routes (one module each in server/routes/, over the explicit ``server.state.State``):
POST /v1/completions, POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models, POST /tokenize, POST /detokenize,
GET /health, GET /metrics, GET / (the demonstration page).
Every error is OpenAI's object {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import Guard, error_response
from .metrics import Metrics
from .requests import ApiError
from .responses import json_response, orjson  # noqa: F401 - orjson: the encoder _json uses (tests swap it)
from .chat import ChatTemplate
from .routes import chat, completions, embeddings, metrics, page, tokens
from .state import ClientGone, ForwardWorker, State

ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"}


@dataclass
class ServerConfig:
    model_name: str = "gpt2ja"
    api_key: Optional[str] = None
    cors: List[str] = field(default_factory=list)
    max_body: int = 1 << 20          # bytes
    timeout: float = 600.0           # seconds per request
    retry_after: int = 1             # seconds, in 429 answers
    read_timeout: float = 30.0       # seconds to receive a request's body
    #: names a request's Host may give besides IP addresses and localhost ("*": any)
    allowed_hosts: List[str] = field(default_factory=list)
    #: how /v1/chat/completions writes messages as text (--chat_template)
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)


def create_app(model, enc, engine, config: ServerConfig) -> FastAPI:
    """The ASGI app.  ``engine`` is a started ``tasks.serving.Engine`` over ``model``."""
    # one batched forward pass (vectors, scores) at a time, below decoding's priority where decoding
    # does not run on TensorFlow
    forward = ForwardWorker(lambda: getattr(getattr(engine, "decoder", None), "engine", None) != "tf")
    state = State(model=model, enc=enc, engine=engine, config=config, metrics=Metrics(engine), forward=forward)
    from encoder.parallel import EncoderPool

    state.encoder_pool = EncoderPool(enc)  # started on the first long input; closed with the engine
    app = FastAPI(title="gpt2-japanese", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.state.engine = engine
    app.state.metrics = state.metrics
    for module in (page, metrics, tokens, embeddings, completions, chat):
        app.include_router(module.router)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(ClientGone)
    async def _client_gone(request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif e.status_code == 405:
            err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            err = ApiError(e.status_code, str(e.detail))
        return error_response(err)

    app.add_middleware(Guard, config=config, metrics=state.metrics, routes=ROUTES)
    if config.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _json(obj) -> Response:
    """A JSON response encoded at once (orjson when installed; see ``responses.json_response``)."""
    return json_response(obj, orjson)
