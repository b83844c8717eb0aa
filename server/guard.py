"""The outermost checks of every HTTP request: the Host header, the API key; and the request metrics."""
from __future__ import annotations

import hmac
import logging
import ipaddress
import time

from fastapi.responses import JSONResponse

from .requests import ApiError

log = logging.getLogger("gpt2ja.server")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def host_allowed(host_header: str, allowed) -> bool:
    """Whether a request's Host names this server: an IP address, localhost (or a name under .localhost),
    or a name of ``allowed`` (--host and --allowed_hosts; ``*`` allows any).  A page a browser loaded
    from an attacker's name that later resolves to 127.0.0.1 (DNS rebinding) sends that name: refused."""
    if "*" in allowed or not host_header:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    if host == "localhost" or host.endswith(".localhost") or host in allowed:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware: refuses a foreign Host (403) and a missing or wrong API key (401, compared in
    constant time), and counts every request in the metrics."""

    OPEN = {"/health", "/"}

    def __init__(self, app, config, metrics, routes):
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.key = f"Bearer {config.api_key}".encode("ascii") if config.api_key else None
        self.allowed = {h.strip().lower().rstrip(".") for h in config.allowed_hosts if h.strip()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = [500]
        started = [False]
        t0 = time.perf_counter()

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
            await send(message)

        self.metrics.in_progress.labels(route).inc()
        try:
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.allowed):
                err = ApiError(403, f"the Host {host!r} is not one of this server's names (see --allowed_hosts)",
                               type="invalid_request_error", code="host_not_allowed")
                return await error_response(err)(scope, receive, sending)
            if self.key is not None and path not in self.OPEN and scope["method"] != "OPTIONS":
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(given, self.key):
                    err = ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                   type="authentication_error", code="invalid_api_key")
                    return await error_response(err)(scope, receive, sending)
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - a bug: one line in the log, OpenAI's error object to the client
            log.error("%s %s failed: %s: %s", scope["method"], path, type(e).__name__, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            if not started[0]:
                err = ApiError(500, f"internal error: {type(e).__name__}", type="server_error",
                               code="internal_error")
                await error_response(err)(scope, receive, sending)
        finally:
            self.metrics.in_progress.labels(route).dec()
            self.metrics.request(route, status[0], time.perf_counter() - t0)
