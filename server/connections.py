"""A limit uvicorn lacks: the time a connection may take to send a request's headers.

uvicorn closes a keep-alive connection idle for ``timeout_keep_alive`` seconds, and answers 503 past
``limit_concurrency`` connections, but a connection that sends nothing, or its headers a byte at a time,
is kept for ever (slowloris).  ``with_header_timeout`` wraps uvicorn's HTTP protocol class: from the
moment a connection opens, or the first byte of a request after a response, the request's headers must
be complete within ``seconds`` or the connection is closed.  (Bodies have their own limit in
``server.body.read_json``.)

It also hands the app a way to drop a connection at once: ``scope["extensions"]["gpt2ja.abort"]["abort"]``
(``transport.abort``), and the transport itself (``["transport"]``: a stream watches its buffer).  Returning without finishing a response makes uvicorn ``close()`` the transport,
which first writes out what is buffered: a client that stopped reading would keep that buffer, and the
connection, for as long as it likes."""
from __future__ import annotations

ABORT = "gpt2ja.abort"


def with_header_timeout(protocol_class, seconds: float):
    class HeaderTimeout(protocol_class):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                extensions = cycle.scope.setdefault("extensions", {})
                if ABORT not in extensions:
                    extensions[ABORT] = {"abort": self.transport.abort, "transport": self.transport}

        def connection_lost(self, exc) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _awaiting_headers(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _watch_headers(self) -> None:
            if self._awaiting_headers():
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)
            else:
                self._stop_header_timer()

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._awaiting_headers() and not self.transport.is_closing():
                self.transport.close()

    HeaderTimeout.__name__ = HeaderTimeout.__qualname__ = f"HeaderTimeout{protocol_class.__name__}"
    return HeaderTimeout
