"""gpt2-server.py: an OpenAI-compatible HTTP server over one model, with continuous batching."""
from __future__ import annotations

import argparse
import gc
import os
import sys

from . import common, flags
from .errors import ArgumentParser, UsageError


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-server.py",
        description="Serve a Japanese GPT-2 model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, "
                    "/v1/embeddings, /v1/models), /tokenize, /detokenize, /health, /metrics and a demonstration page at /.",
        epilog="Example: python gpt2-server.py --model gpt2ja-small --port 8000, then open http://127.0.0.1:8000/",
    )
    flags.add_model_flags(p)
    flags.add(p, "batch_size", batch_size={
        "help": "samples decoded together; requests join the running batch at the next step (default %(default)s)"})
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_port, default=8000,
                   help="TCP port (default %(default)s; 0 picks a free one, printed on stderr)")
    p.add_argument("--allowed_hosts", action="append", default=[], metavar="NAME",
                   help="a host name clients may reach this server by (the Host header), besides IP addresses, "
                        "localhost and --host; repeatable; * allows any. Other names get 403: a web page on a "
                        "name that resolves to this machine (DNS rebinding) cannot read the answers")
    p.add_argument("--api_key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page; printable "
                        "ASCII (default: $GPT2JA_API_KEY; none when unset)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages of ORIGIN (e.g. https://example.com, or *) to call the API; repeatable; "
                        "default: no CORS headers")
    p.add_argument("--max_queue", type=flags.non_negative_int, default=256, metavar="N",
                   help="samples that may wait for a place in the batch; past it requests get 429 with "
                        "Retry-After (default %(default)s)")
    p.add_argument("--timeout", type=flags.positive_float, default=600.0, metavar="SECONDS",
                   help="longest time one request may take; then it is cancelled (504) (default %(default)s)")
    p.add_argument("--read_timeout", type=flags.positive_float, default=30.0, metavar="SECONDS",
                   help="longest time a client may take to send a request's headers, and again its body, and "
                        "to take nothing of what a stream sent it while a write waits; then the connection is "
                        "closed (headers, a stream: its samples are cancelled) or answered 408 (body) "
                        "(default %(default)s)")
    p.add_argument("--max_connections", type=flags.positive_int, default=512, metavar="N",
                   help="open connections (and requests in progress) at most; past it new requests get 503 "
                        "(default %(default)s)")
    p.add_argument("--max_body", type=flags.positive_int, default=1 << 20, metavar="BYTES",
                   help="largest request body; larger ones get 413 (default %(default)s)")
    p.add_argument("--grace", type=flags.positive_float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C: stop accepting, let requests in flight finish for this long, "
                        "then cancel them and exit 0 (default %(default)s)")
    p.add_argument("--served_model_name", default=None, metavar="NAME",
                   help="the model id of the API (default: the model directory's name)")
    p.add_argument("--engine", choices=("auto", "numpy", "tf", "onnx"), default="auto",
                   help="decoding engine, as gpt2-generate.py's (default auto)")
    p.add_argument("--chat_template", default=None, metavar="FILE",
                   help="how /v1/chat/completions writes the messages as one text: a JSON file with any of the keys "
                        "system, user, assistant ({content} templates), generation, stop (docs/server.md; default: "
                        "'ユーザー: ...' / 'アシスタント: ...' lines)")
    flags.add(p, "quantize")
    return p


def _port(text: str) -> int:
    value = flags.non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0 to 65535, got {value}")
    return value


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    api_key = args.api_key if args.api_key is not None else os.environ.get("GPT2JA_API_KEY") or None
    if api_key is not None and not (api_key.isascii() and api_key.isprintable() and " " not in api_key):
        raise UsageError("--api_key (or $GPT2JA_API_KEY): must be printable ASCII without spaces "
                         "(an HTTP header carries it)")
    if args.quantize != "none" and args.engine not in ("auto", "onnx"):
        raise UsageError(f"--quantize {args.quantize} decodes with the onnx engine: leave out --engine {args.engine}")
    template = None
    if args.chat_template is not None:
        from server.chat import load_template

        try:
            template = load_template(args.chat_template)
        except ValueError as e:
            raise UsageError(f"--chat_template: {e}") from None
    import signal
    import socket

    try:
        import uvicorn
    except ImportError:
        raise UsageError("the server needs fastapi and uvicorn: pip install -r requirements.txt") from None
    from server.app import ServerConfig, create_app
    from server.connections import with_header_timeout
    from tasks.serving import Engine

    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    enc = common.load_encoder(args)
    m = common.load_model(args, enc)
    engine = Engine(m, enc, batch_size=args.batch_size, max_queue=args.max_queue, engine=args.engine,
                    quantize=None if args.quantize == "none" else args.quantize).start()
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    config = ServerConfig(model_name=name, api_key=api_key, cors=list(args.cors), max_body=args.max_body,
                          timeout=args.timeout, read_timeout=args.read_timeout,
                          allowed_hosts=[args.host, *args.allowed_hosts])
    if template is not None:
        config.chat_template = template
    app = create_app(m, enc, engine, config)
    app.state.server.warm_up()
    # What is loaded by now (TensorFlow, the model, the encoder: hundreds of thousands of objects) lives as
    # long as the server: out of the garbage collector's reach, its full collections walk only what requests
    # make (they walked it all: 280 ms on the tiny model, every stream waiting).
    gc.collect()
    gc.freeze()
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    sys.stderr.write(f"gpt2-server.py: serving {name} on http://{shown}:{port}/ "
                     f"(engine {engine.decoder.engine}, batch {args.batch_size})\n")
    sys.stderr.flush()
    _log_lines(args.verbose)
    # The event loop shares the GIL with the decoding thread and the workers that encode texts: with Python's
    # default 5 ms switch interval each of its wake-ups can wait 5 ms behind them (tokenising one long request
    # made every other client's requests 5-10x slower); 0.5 ms keeps it responsive.
    sys.setswitchinterval(0.0005)
    uconfig = uvicorn.Config(app, log_level="info" if args.verbose else "warning",
                             timeout_graceful_shutdown=args.grace, access_log=args.verbose, lifespan="off",
                             timeout_keep_alive=5, limit_concurrency=args.max_connections)
    uconfig.load()
    uconfig.http_protocol_class = with_header_timeout(uconfig.http_protocol_class, args.read_timeout)
    server = _server_class()(uconfig, app.state.server, args.grace)
    # uvicorn handles SIGTERM/SIGINT (graceful shutdown) and re-raises the signal when done: a handler that
    # does nothing makes that a clean exit, status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(cancel=True)
        app.state.server.encoder_pool.close()
        app.state.server.forward.close()
    sys.stderr.write("gpt2-server.py: stopped\n")
    return 0


def _log_lines(verbose: bool) -> None:
    """The server's own log lines on stderr, one line each ("gpt2-server.py: ..."); uvicorn's line for a
    stream closed on a client that stopped reading is left out (the server says it in its own words)."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gpt2-server.py: %(message)s"))
    log = logging.getLogger("gpt2ja")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False

    class _Quiet(logging.Filter):
        def filter(self, record) -> bool:
            return "returned without completing response" not in record.getMessage()

    logging.getLogger("uvicorn.error").addFilter(_Quiet())


def _server_class():
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, which also tells the app when a shutdown begins: requests still running near
        the end of --grace then end with an error object (or an error event and [DONE]) of their own,
        before uvicorn would cancel them with a bare 500 and a traceback."""

        def __init__(self, config, state, grace: float):
            super().__init__(config)
            self.state = state
            self.grace = grace
            self.loop = None

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            if self.loop is not None and self.state.stop_by is None:
                self.loop.call_soon_threadsafe(self.state.begin_shutdown, self.grace)
            super().handle_exit(sig, frame)

    return Server
