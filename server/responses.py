"""JSON responses encoded at once, and Server-Sent Events."""
from __future__ import annotations

import asyncio
import json

from fastapi.responses import Response

try:
    import orjson
except ImportError:  # optional: faster JSON for embeddings
    orjson = None


def json_response(obj, fast=True) -> Response:
    """A JSON response encoded at once.  FastAPI's own encoder walks every number: 0.42 s for 100 vectors
    of 768, json.dumps 0.06-0.19 s, orjson (when installed; float32 arrays as their shortest float32
    digits, which read back to the same float32) 3 ms and half the bytes.  ``fast``: True for orjson when
    installed, or the orjson module to use, or None for json.dumps (numpy arrays as lists)."""
    lib = orjson if fast is True else fast
    if lib is not None:
        return Response(lib.dumps(obj, option=lib.OPT_SERIALIZE_NUMPY), media_type="application/json")
    return Response(json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_as_list),
                    media_type="application/json")


def _as_list(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


class EventStream(Response):
    """A text/event-stream response whose every write must be taken by the client within ``stall`` seconds
    (the server's --read_timeout) and before ``until()`` (the request's deadline: --timeout, or the
    shutdown's) plus ``grace`` seconds.  A client that stops reading fills the socket's buffers and then
    the write waits: past either limit the connection is closed (and ``on_close`` frees the request's
    samples) instead of its rows being decoded for a reader that is not there -- as a client that stalls
    while sending its request is cut off after --read_timeout.  A client that reads slowly but reads is
    not: each write only has to make it through the buffers within ``stall``."""

    media_type = "text/event-stream"

    def __init__(self, chunks, until, on_close, grace: float = 0.5, stall: float = float("inf")):
        self.chunks = chunks
        self.until = until
        self.on_close = on_close
        self.grace = grace
        self.stall = stall
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope, receive, send) -> None:
        from .state import ClientGone, log

        loop = asyncio.get_running_loop()

        async def timed(message):
            async with asyncio.timeout_at(min(self.until() + self.grace, loop.time() + self.stall)):
                await send(message)

        try:
            await timed({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await timed({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            await timed({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            log.warning("a client stopped reading its stream (for --read_timeout, or past the request's deadline): "
                        "connection closed")
            abort = (scope.get("extensions") or {}).get("gpt2ja.abort")
            if abort is not None:  # what is buffered for it is dropped too (see server.connections)
                abort["abort"]()
        except ClientGone:
            pass
        finally:
            await self.chunks.aclose()
            self.on_close()
