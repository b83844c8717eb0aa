"""The OpenAI-compatible HTTP API over one model, one Engine and the tasks of tasks/.

Routes: POST /v1/completions, POST /v1/embeddings, GET /v1/models, POST /tokenize,
POST /detokenize, GET /health, GET /metrics, GET / (the demonstration page).
Every error is OpenAI's object {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import base64
import html
import json
import pathlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

try:
    import orjson
except ImportError:  # optional: faster JSON for embeddings
    orjson = None

from tasks.errors import OptionError
from tasks.sampling import SamplingParams
from tasks.serving import EngineStopped, QueueFull, SampleRequest, deliver_each, vector_batches

from . import requests as rq
from .metrics import Metrics
from .requests import ApiError

PAGE = pathlib.Path(__file__).with_name("static") / "index.html"
DEFAULT_TOP_K = 40
DEFAULT_MAX_TOKENS = 16
MAX_N = 128


@dataclass
class ServerConfig:
    model_name: str = "gpt2ja"
    api_key: Optional[str] = None
    cors: List[str] = field(default_factory=list)
    max_body: int = 1 << 20          # bytes
    timeout: float = 600.0           # seconds per request
    retry_after: int = 1             # seconds, in 429 answers


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Guard:
    """Outermost checks of every HTTP request: the API key, and the request metrics."""

    OPEN = {"/health", "/"}

    def __init__(self, app, config: ServerConfig, metrics: Metrics, routes):
        self.app = app
        self.config = config
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = [500]
        t0 = time.perf_counter()

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            key = self.config.api_key
            if key and path not in self.OPEN and scope["method"] != "OPTIONS":
                headers = dict(scope["headers"])
                given = headers.get(b"authorization", b"").decode("latin-1")
                if given != f"Bearer {key}":
                    err = ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                   type="authentication_error", code="invalid_api_key")
                    return await _error_response(err)(scope, receive, sending)
            await self.app(scope, receive, sending)
        finally:
            self.metrics.request(route, status[0], time.perf_counter() - t0)


async def read_json(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", type="invalid_request_error",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    return rq.as_object(data)


@dataclass
class _Completion:
    """A parsed /v1/completions request."""

    prompts: list
    n: int
    max_tokens: int
    max_length: Optional[int]
    params: SamplingParams
    seed: Optional[int]
    stop: tuple
    stream: bool
    echo: bool
    logprobs: Optional[int]
    include_usage: bool


def create_app(model, enc, engine, config: ServerConfig, tf_lock: Optional[threading.Lock] = None) -> FastAPI:
    """The ASGI app.  ``engine`` is a started ``tasks.serving.Engine`` over ``model``."""
    from tasks.score import Scorer
    from tasks.vectors import Vectorizer

    hp = model.hparams
    metrics = Metrics(engine)
    tf_lock = tf_lock or threading.Lock()  # one batched TensorFlow computation (vectors, scores) at a time
    scorer = Scorer(model, enc, exclude_end=True)
    created = int(time.time())
    app = FastAPI(title="gpt2-japanese", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif e.status_code == 405:
            err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            err = ApiError(e.status_code, str(e.detail))
        return _error_response(err)

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and name != config.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    def ids_of(item) -> List[int]:
        return list(item) if isinstance(item, list) else enc.encode(item)

    def text_of(item) -> str:
        return enc.decode(item) if isinstance(item, list) else item

    # -- the page, health, models, metrics ----------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(config.model_name)))

    @app.get("/health")
    async def health():
        if engine.failure is not None:
            return JSONResponse({"status": "error", "error": repr(engine.failure)}, status_code=503)
        return {"status": "ok", "model": config.model_name, "queue": engine.queue_length, "rows": engine.active_rows}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": created, "owned_by": "gpt2-japanese",
             "max_model_len": hp.n_ctx}]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # -- tokens -------------------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request, config.max_body)
        check_model(body)
        text = body.get("prompt", body.get("text"))
        if not isinstance(text, str):
            raise ApiError(400, "prompt: must be a string", param="prompt", code="invalid_value")
        try:
            ids = enc.encode(text)
        except ValueError as e:
            raise rq.bad("prompt", str(e)) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": hp.n_ctx}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request, config.max_body)
        check_model(body)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "tokens: must be a list of token ids", param="tokens", code="invalid_value")
        for t in ids:
            if not 0 <= t < len(enc):
                raise rq.bad("tokens", f"token id {t} is outside the vocabulary (0..{len(enc) - 1})")
        return {"prompt": enc.decode(ids)}

    # -- embeddings ---------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_json(request, config.max_body)
        check_model(body)
        items = rq.texts_or_tokens(body, "input", hp.n_vocab)
        fmt = rq.choice(body, "encoding_format", "float", ("float", "base64"))
        pooling = rq.choice(body, "pooling", "last", ("last", "mean"))
        layer = rq.integer(body, "layer", -1)
        normalize = rq.boolean(body, "normalize", False)
        if body.get("dimensions") is not None and body["dimensions"] != hp.n_embd:
            raise rq.bad("dimensions", f"this model's vectors have {hp.n_embd} dimensions")
        try:
            vec = Vectorizer(model, enc, pooling=pooling, layer=layer, normalize=normalize)
        except OptionError as e:
            raise rq.bad(e.option, e.reason) from None
        try:
            id_lists = [vec.ids(item)[0] if isinstance(item, str) else
                        (list(item[-hp.n_ctx:]) or [enc.eos_id]) for item in items]
        except ValueError as e:
            raise rq.bad("input", str(e)) from None

        def compute():
            out = np.empty((len(id_lists), hp.n_embd), np.float32)
            with tf_lock:
                for rows in vector_batches([len(ids) for ids in id_lists], vec.max_tokens, vec.max_batch):
                    out[rows] = vec.batch_vectors([id_lists[i] for i in rows])
            return out

        vectors = await run_in_threadpool(compute)
        data = []
        for i, v in enumerate(vectors):
            if fmt == "base64":
                emb = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
            else:
                emb = v if orjson is not None else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(len(ids) for ids in id_lists)
        return _json({"object": "list", "data": data, "model": config.model_name,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # -- completions --------------------------------------------------------------------

    def parse_completion(body: dict) -> _Completion:
        check_model(body)
        prompts = rq.texts_or_tokens(body, "prompt", hp.n_vocab)
        n = rq.integer(body, "n", 1, 1, MAX_N)
        if body.get("best_of") not in (None, n):
            raise rq.bad("best_of", "is not supported (only best_of = n)")
        for name in ("presence_penalty", "frequency_penalty"):
            if rq.number(body, name, 0.0, -2.0, 2.0) != 0.0:
                raise rq.bad(name, "is not supported (only 0)")
        if body.get("suffix") not in (None, ""):
            raise rq.bad("suffix", "is not supported")
        if body.get("logit_bias") not in (None, {}):
            raise rq.bad("logit_bias", "is not supported")
        max_tokens = rq.integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 0)
        max_length = rq.integer(body, "max_length", None, 0)
        temperature = rq.number(body, "temperature", 1.0, 0.0, 1e30)
        top_p = rq.number(body, "top_p", 1.0, 0.0, 1.0)
        top_k = rq.integer(body, "top_k", None, 0)
        if top_p < 1.0:
            if top_k not in (None, 0):
                raise rq.bad("top_k", "top_k and top_p (below 1) are exclusive: give one of them")
            top_k, top_p = 0, (top_p if top_p > 0 else 1e-12)  # top_p 0: only the most likely token
        else:
            top_p = 0.0  # 1: no top_p filter
            top_k = DEFAULT_TOP_K if top_k is None else top_k
        seed = rq.integer(body, "seed", None, 0, 2 ** 64 - 1)
        stop = rq.stops(body)
        stream = rq.boolean(body, "stream", False)
        echo = rq.boolean(body, "echo", False)
        logprobs = rq.integer(body, "logprobs", None, 0, 5)
        if stream and logprobs is not None:
            raise rq.bad("logprobs", "is not supported together with stream")
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not stream or not isinstance(options, dict):
                raise rq.bad("stream_options", "must be an object, and only with stream")
            include_usage = rq.boolean(options, "include_usage", False)
        try:
            params = SamplingParams(top_k=top_k, top_p=top_p, temperature=temperature)
        except OptionError as e:
            raise rq.bad(e.option, e.reason) from None
        return _Completion(prompts, n, max_tokens, max_length, params, seed, stop, stream, echo, logprobs,
                           include_usage)

    def submit(c: _Completion, on_event) -> Tuple[list, List[List[int]]]:
        """Queue every sample: jobs[prompt * n + i]; and each prompt's full token ids."""
        full, requests = [], []
        for j, item in enumerate(c.prompts):
            try:
                ids = ids_of(item)
            except ValueError as e:
                raise rq.bad("prompt", str(e)) from None
            full.append(ids)
            context = ids[-(hp.n_ctx // 2):] or [enc.eos_id]  # as gpt2-generate.py: the last n_ctx/2 tokens
            for i in range(c.n):
                rng = (np.random.default_rng(np.random.SeedSequence([c.seed, j, i])) if c.seed is not None
                       else np.random.default_rng())
                requests.append(SampleRequest(context, c.params, rng=rng, max_tokens=c.max_tokens,
                                              max_length=c.max_length, stop=c.stop, logprobs=c.logprobs))
        if c.max_tokens == 0 or c.max_length == 0:
            return [None] * len(requests), full
        try:
            jobs = engine.submit_many(requests, on_event)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; try again later", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(config.retry_after)}) from None
        except EngineStopped as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        return jobs, full

    def channel():
        """An asyncio queue fed with this request's events.  The engine hands each step's events of every
        request over at once (one call_soon_threadsafe per step, see ``Engine.deliver``); on_event runs on
        the event loop."""
        loop = asyncio.get_running_loop()
        if getattr(engine.deliver, "loop", None) is not loop:
            engine.deliver = _LoopDelivery(loop)
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(job, kind, data):
            queue.put_nowait((job, kind, data))

        return queue, on_event

    def logprobs_object(job, k: int, offset: int, text: str) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset
        for token, lp, top in job.logprobs:
            if pos - offset >= len(text):
                break
            piece = enc.decode([token])
            tokens.append(piece)
            lps.append(lp)
            tops.append({enc.decode([t]): v for t, v in top} if k > 0 else None)
            offsets.append(pos)
            pos += len(piece)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def prompt_logprobs(full: List[List[int]]) -> List[np.ndarray]:
        def compute():
            with tf_lock:
                out = [np.zeros(0, np.float32)] * len(full)
                for i, lp in scorer.score_token_lists(full):
                    out[i] = lp
                return out

        return await run_in_threadpool(compute)

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.monotonic()
        body = await read_json(request, config.max_body)
        c = parse_completion(body)
        queue, on_event = channel()
        jobs, full = submit(c, on_event)
        cid = "cmpl-" + uuid.uuid4().hex
        now = int(time.time())
        live = [j for j in jobs if j is not None]
        deadline = t0 + config.timeout

        def cancel_all():
            for j in live:
                j.cancel()

        def base(choices):
            return {"id": cid, "object": "text_completion", "created": now, "model": config.model_name,
                    "choices": choices}

        def usage():
            prompt_tokens = sum(len(ids) for ids in full)
            completion = sum(len(j.tokens) for j in live if j.done)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        index = {id(j): k for k, j in enumerate(jobs) if j is not None}

        if c.stream:
            async def events():
                remaining = len(live)
                try:
                    for k, job in enumerate(jobs):
                        first = text_of(c.prompts[k // c.n]) if c.echo else ""
                        if job is None or first:
                            yield _sse(base([{"text": first, "index": k, "logprobs": None,
                                              "finish_reason": "length" if job is None else None}]))
                    while remaining:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            cancel_all()
                            err = ApiError(504, f"the request took longer than {config.timeout:g} s",
                                           type="timeout", code="timeout")
                            yield _sse(err.body())
                            break
                        try:
                            events = [await asyncio.wait_for(queue.get(), min(left, 1.0))]
                        except asyncio.TimeoutError:
                            continue
                        while not queue.empty():  # a step's events of this request: one write
                            events.append(queue.get_nowait())
                        out = []
                        for job, kind, data in events:
                            k = index[id(job)]
                            if kind == "text":
                                metrics.first_token(job)
                                out.append(_sse(base([{"text": data, "index": k, "logprobs": None,
                                                       "finish_reason": None}])))
                            elif kind == "done":
                                remaining -= 1
                                out.append(_sse(base([{"text": "", "index": k, "logprobs": None,
                                                       "finish_reason": job.finish_reason}])))
                            else:
                                remaining -= 1
                                out.append(_sse(ApiError(500, f"generation failed: {data!r}",
                                                         type="server_error").body()))
                        yield "".join(out)
                    if c.include_usage:
                        yield _sse({**base([]), "usage": usage()})
                    yield "data: [DONE]\n\n"
                finally:
                    cancel_all()  # a client gone mid-stream: its rows leave at the next step
                    metrics.latency("/v1/completions", time.monotonic() - t0)

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        try:
            remaining = len(live)
            while remaining:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(504, f"the request took longer than {config.timeout:g} s", type="timeout",
                                   code="timeout")
                try:
                    job, kind, data = await asyncio.wait_for(queue.get(), min(left, 0.5))
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if kind == "text":
                    metrics.first_token(job)
                elif kind == "done":
                    remaining -= 1
                elif kind == "error":
                    raise ApiError(500, f"generation failed: {data!r}", type="server_error")
        finally:
            cancel_all()
        echo_lps = await prompt_logprobs(full) if (c.echo and c.logprobs is not None) else None
        choices = []
        for k, job in enumerate(jobs):
            p = k // c.n
            prefix = text_of(c.prompts[p]) if c.echo else ""
            text = job.text if job is not None else ""
            lp = None
            if c.logprobs is not None:
                lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                if echo_lps is not None:
                    pos = 0
                    for token, value in zip(full[p], echo_lps[p]):
                        piece = enc.decode([token])
                        lp["tokens"].append(piece)
                        lp["token_logprobs"].append(float(value))
                        lp["top_logprobs"].append(None)
                        lp["text_offset"].append(pos)
                        pos += len(piece)
                if job is not None:
                    more = logprobs_object(job, c.logprobs, len(prefix), text)
                    for key in lp:
                        lp[key] += more[key]
            choices.append({"text": prefix + text, "index": k, "logprobs": lp,
                            "finish_reason": job.finish_reason if job is not None else "length"})
        metrics.latency("/v1/completions", time.monotonic() - t0)
        return {**base(choices), "usage": usage()}

    app.add_middleware(_Guard, config=config, metrics=metrics,
                       routes={"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/embeddings",
                               "/tokenize", "/detokenize"})
    if config.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


class _LoopDelivery:
    """``Engine.deliver`` for an asyncio server: a step's events go to their requests' queues with one
    ``call_soon_threadsafe`` (one wake-up of the event loop per step)."""

    def __init__(self, loop):
        self.loop = loop

    def __call__(self, events) -> None:
        try:
            self.loop.call_soon_threadsafe(deliver_each, events)
        except RuntimeError:  # the loop is closed: the server is gone
            pass


def _json(obj) -> Response:
    """A JSON response encoded at once.  FastAPI's own encoder walks every number: 0.42 s for 100 vectors
    of 768, json.dumps 0.06-0.19 s, orjson (when installed; float32 arrays as their shortest float32
    digits, which read back to the same float32) 3 ms and half the bytes."""
    if orjson is not None:
        return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
    return Response(json.dumps(obj, ensure_ascii=False, separators=(",", ":")), media_type="application/json")


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"
