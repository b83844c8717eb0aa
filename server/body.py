"""Reading a POST body: application/json only, at most --max_body bytes, within --read_timeout, nested
at most MAX_DEPTH deep.  Every refusal is an ApiError (OpenAI's error object); a client that hangs up
mid-body is ClientGone (answered with nothing, logged with nothing)."""
from __future__ import annotations

import asyncio
import json

from starlette.requests import ClientDisconnect, Request

from . import requests as rq
from .requests import ApiError
from .state import ClientGone

#: deepest nesting of arrays and objects a body may have (OpenAI's bodies need 3)
MAX_DEPTH = 32


def check_content_type(request: Request) -> None:
    """A body must say it is JSON.  A web page can POST text/plain or a form to 127.0.0.1 without a CORS
    preflight; it cannot send application/json without one, which this server answers only for --cors."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, "the request body must be sent as Content-Type: application/json"
                       + (f" (got {media})" if media else ""), code="unsupported_media_type")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", type="invalid_request_error",
                    code="request_too_large")


async def read_json(request: Request, config) -> dict:
    check_content_type(request)
    limit = config.max_body
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(config.read_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    except TimeoutError:
        raise ApiError(408, f"the request body was not received within {config.read_timeout:g} s",
                       code="request_timeout") from None
    too_deep = False
    try:
        data = json.loads(b"".join(chunks).decode("utf-8"))
    except RecursionError:
        too_deep = True
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if too_deep or depth(data) > MAX_DEPTH:
        raise ApiError(400, f"the request body is nested more than {MAX_DEPTH} deep", code="invalid_json")
    return rq.as_object(data)


def depth(value) -> int:
    """The nesting depth of parsed JSON (0 for a scalar), without recursion."""
    deepest = 0
    todo = [(value, 1)] if isinstance(value, (list, dict)) else []
    while todo:
        item, d = todo.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            break
        for child in (item.values() if isinstance(item, dict) else item):
            if isinstance(child, (list, dict)):
                todo.append((child, d + 1))
    return deepest
