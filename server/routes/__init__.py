"""The server's routes, one module each, over the explicit ``server.state.State``
(``request.app.state.server``): completions, embeddings, tokens, page, metrics (with health and models)."""
from fastapi import Request

from ..state import State


def state_of(request: Request) -> State:
    return request.app.state.server


def check_model(state: State, body: dict) -> None:
    from ..requests import ApiError

    name = body.get("model")
    if name is not None and name != state.config.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {state.config.model_name!r}",
                       param="model", code="model_not_found")
