"""JSON responses encoded at once, and Server-Sent Events."""
from __future__ import annotations

import asyncio
import json
import socket
import struct

try:  # (Linux, macOS) the bytes still in a socket's send queue
    import fcntl
    import termios
except ImportError:  # Windows
    fcntl = termios = None

from fastapi.responses import Response

from .connections import ABORT

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


#: The kernel's send buffer of a stream's socket.  Linux grows a socket's buffer up to 4 MB as it sees fit:
#: a client that stops reading then takes megabytes of text -- thousands of steps of its rows, at their whole
#: length, computed for nobody -- before a write waits and its rows are held.  Text streams need little:
#: 64 KiB (the kernel doubles it) carries 1.3 MB/s at a 100 ms round trip.
STREAM_SNDBUF = 64 << 10
#: How often a stream's write that waits looks whether the client has taken any of it (seconds).
PROGRESS_CHECK = 0.1


def _unsent(transport) -> int:
    """Bytes written to a connection that its client has not taken yet: those the transport still holds,
    and (Linux) those in the socket's send queue, which the kernel refills only once a third of it is free
    -- a client that reads a little at a time empties it long before the transport's own buffer moves."""
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and termios is not None and hasattr(termios, "TIOCOUTQ"):
        try:
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            pass
    return size


class EventStream(Response):
    """A text/event-stream response whose client must keep taking what it is sent: a write that waits (the
    socket's buffers are full) may wait ``stall`` seconds (the server's --read_timeout) without the client
    taking any of what is buffered, and never past ``until()`` (the request's deadline: --timeout, or the
    shutdown's) plus ``grace`` seconds.  A client that stops reading fills the buffers and then the write
    waits: past either limit the connection is closed (and ``on_close`` frees the request's samples)
    instead of its rows being decoded for a reader that is not there -- as a client that stalls while
    sending its request is cut off after --read_timeout.  A client that reads slowly but reads is not:
    every byte it takes starts the wait again."""

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
        connection = (scope.get("extensions") or {}).get(ABORT) or {}
        transport = connection.get("transport")
        if transport is not None:
            sock = transport.get_extra_info("socket")
            try:  # see STREAM_SNDBUF
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
            except OSError:
                pass

        async def timed(message):
            end = self.until() + self.grace
            if transport is None:  # no view of the buffer: the write itself within --read_timeout
                async with asyncio.timeout_at(min(end, loop.time() + self.stall)):
                    await send(message)
                return
            sending = asyncio.ensure_future(send(message))
            try:
                left, since = _unsent(transport), loop.time()
                while True:
                    limit = min(end, since + self.stall)
                    if loop.time() >= limit:
                        raise TimeoutError
                    done, _ = await asyncio.wait({sending}, timeout=min(PROGRESS_CHECK, limit - loop.time()))
                    if done:
                        return sending.result()
                    now_left = _unsent(transport)
                    if now_left < left:  # the client took some of it: it reads, however slowly
                        since = loop.time()
                    left = now_left
            finally:
                if not sending.done():
                    sending.cancel()

        try:
            await timed({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await timed({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            await timed({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            log.warning("a client stopped reading its stream (for --read_timeout, or past the request's deadline): "
                        "connection closed")
            if connection:  # what is buffered for it is dropped too (see server.connections)
                connection["abort"]()
        except ClientGone:
            pass
        finally:
            await self.chunks.aclose()
            self.on_close()
