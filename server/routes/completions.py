"""POST /v1/completions: one path for streaming and non-streaming answers.

A request is read and checked (every limit, the capacity of the engine) before any sample is built;
its prompts are encoded and its samples built on a worker thread; its samples are submitted to the
engine; ``step_events`` turns the engine's events into the completion's events, one list per decoding
step.  A stream writes each list as Server-Sent Events; a non-streaming answer is the same events
collected.  The request's channel ends it early: --timeout (504), the server shutting down (503), the
client hanging up (its samples are cancelled at once)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, List, Optional, Tuple

import numpy as np
from fastapi import APIRouter, Request

from tasks.errors import OptionError
from tasks.sampling import SamplingParams
from tasks.serving import EngineStopped, QueueFull, SampleRequest

from .. import requests as rq
from ..body import read_json
from ..requests import ApiError
from ..responses import EventStream, sse
from ..state import DISCONNECT, SHUTDOWN, TIMEOUT, Channel, State, acquire
from . import check_model, state_of

DEFAULT_TOP_K = 40
DEFAULT_MAX_TOKENS = 16
MAX_N = 128
#: largest max_tokens and max_length: the sliding window decodes past n_ctx as gpt2-generate.py does,
#: so the bound is not n_ctx; --timeout bounds the time a request takes
MAX_TOKENS = 1_000_000
#: characters of one stop string (at most 4 of them, as OpenAI)
MAX_STOP_CHARS = 256

router = APIRouter()


@dataclass
class Completion:
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

    @property
    def samples(self) -> int:
        """Samples the engine decodes (none when nothing is to be generated: max_tokens or max_length 0)."""
        return 0 if self.max_tokens == 0 or self.max_length == 0 else len(self.prompts) * self.n


def parse(state: State, body: dict) -> Completion:
    check_model(state, body)
    prompts = rq.texts_or_tokens(body, "prompt", state.hparams.n_vocab)
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
    max_tokens = rq.integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 0, MAX_TOKENS)
    max_length = rq.integer(body, "max_length", None, 0, MAX_TOKENS)
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
    stop = rq.stops(body, MAX_STOP_CHARS)
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
    return Completion(prompts, n, max_tokens, max_length, params, seed, stop, stream, echo, logprobs, include_usage)


def check_capacity(state: State, c: Completion) -> None:
    """Before anything is built: a request that can never fit is a 400 (a 429 would have a client retry it
    forever); one that does not fit now is a 429 with Retry-After."""
    needed = c.samples
    if needed == 0:
        return
    if needed > state.capacity():
        raise ApiError(400, f"{len(c.prompts)} prompt(s) x n={c.n} is {needed} samples: more than this server "
                       f"ever holds ({state.capacity()}: --batch_size + --max_queue)", param="n",
                       code="too_many_samples")
    if needed > state.room():
        raise busy(state, f"{state.engine.queue_length} samples are waiting (at most {state.engine.max_queue})")


def busy(state: State, why: str) -> ApiError:
    return ApiError(429, f"the server is busy: {why}; try again later", type="rate_limit_error",
                    code="rate_limit_exceeded", headers={"Retry-After": str(state.config.retry_after)})


def build(state: State, c: Completion, cancelled) -> Tuple[List[List[int]], List[SampleRequest]]:
    """Each prompt's token ids, and the samples: requests[prompt * n + i] (on a worker thread, which stops
    when ``cancelled`` is set)."""
    hp, enc = state.hparams, state.enc
    full, requests = [], []
    for j, item in enumerate(c.prompts):
        if cancelled.is_set():
            return [], []
        try:
            ids = list(item) if isinstance(item, list) else enc.encode(item)
        except ValueError as e:
            raise rq.bad("prompt", str(e)) from None
        full.append(ids)
        if not c.samples:
            continue
        context = ids[-(hp.n_ctx // 2):] or [enc.eos_id]  # as gpt2-generate.py: the last n_ctx/2 tokens
        for i in range(c.n):
            rng = (np.random.default_rng(np.random.SeedSequence([c.seed, j, i])) if c.seed is not None
                   else np.random.default_rng())
            requests.append(SampleRequest(context, c.params, rng=rng, max_tokens=c.max_tokens,
                                          max_length=c.max_length, stop=c.stop, logprobs=c.logprobs))
    return full, requests


def submit(state: State, c: Completion, requests: List[SampleRequest], channel: Channel) -> list:
    """The jobs of the samples (jobs[prompt * n + i]; None each when nothing is generated)."""
    if not c.samples:
        return [None] * (len(c.prompts) * c.n)
    try:
        return state.engine.submit_many(requests, channel.on_event)
    except QueueFull as e:
        raise busy(state, str(e)) from None
    except EngineStopped as e:
        raise ApiError(503, str(e), type="server_error", code="shutting_down") from None


async def step_events(state: State, jobs: list, channel: Channel) -> AsyncIterator[list]:
    """The completion's events, one list per decoding step: ("text", k, piece), ("done", k, finish reason),
    ("error", k, ApiError) for a sample the engine failed, ("error", None, ApiError) when the request ends
    early (then nothing follows).  A client hanging up raises ClientGone.  Every sample left is cancelled
    when the generator ends, however it ends."""
    index = {id(j): k for k, j in enumerate(jobs) if j is not None}
    remaining = len(index)
    try:
        while remaining:
            out = []
            for job, kind, data in await channel.get():
                if job is None:
                    if kind in (TIMEOUT, SHUTDOWN, DISCONNECT):
                        out.append(("error", None, channel.ended(kind)))
                        yield out
                        return
                    continue
                k = index.get(id(job))
                if k is None:
                    continue
                if kind == "text":
                    state.metrics.first_token(job)
                    out.append(("text", k, data))
                elif kind == "done":
                    remaining -= 1
                    out.append(("done", k, job.finish_reason))
                else:
                    remaining -= 1
                    out.append(("error", k, state.fault(data)))
            if out:
                yield out
    finally:
        for job in jobs:
            if job is not None:
                job.cancel()


@router.post("/v1/completions")
async def completions(request: Request):
    state = state_of(request)
    t0 = time.monotonic()
    body = await read_json(request, state.config)
    c = parse(state, body)
    check_capacity(state, c)
    channel = Channel(state, t0 + state.config.timeout, request.receive)
    streaming = False
    try:
        full, requests = await channel.in_worker(lambda cancelled: build(state, c, cancelled))
        jobs = submit(state, c, requests, channel)
        answer = _Answer(state, c, jobs, full)
        if c.stream:
            streaming = True

            def close():
                channel.close()
                state.metrics.latency("/v1/completions", time.monotonic() - t0)

            return EventStream(answer.stream(channel), lambda: channel.until, close)
        result = await answer.collect(channel)
        state.metrics.latency("/v1/completions", time.monotonic() - t0)
        return result
    finally:
        if not streaming:
            channel.close()


class _Answer:
    """The completion object's parts: its id, the choices' texts, usage."""

    def __init__(self, state: State, c: Completion, jobs: list, full: List[List[int]]):
        self.state, self.c, self.jobs, self.full = state, c, jobs, full
        self.id = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())

    def base(self, choices) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.state.config.model_name, "choices": choices}

    def prefix(self, k: int) -> str:
        if not self.c.echo:
            return ""
        item = self.c.prompts[k // self.c.n]
        return self.state.enc.decode(item) if isinstance(item, list) else item

    def usage(self) -> dict:
        prompt_tokens = sum(len(ids) for ids in self.full)
        completion = sum(len(j.tokens) for j in self.jobs if j is not None and j.done)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def chunk(self, k: int, text: str, finish_reason: Optional[str]) -> dict:
        return self.base([{"text": text, "index": k, "logprobs": None, "finish_reason": finish_reason}])

    async def stream(self, channel: Channel) -> AsyncIterator[str]:
        for k, job in enumerate(self.jobs):
            first = self.prefix(k)
            if job is None or first:
                yield sse(self.chunk(k, first, "length" if job is None else None))
        async for events in step_events(self.state, self.jobs, channel):
            out = []
            for kind, k, data in events:
                if kind == "text":
                    out.append(sse(self.chunk(k, data, None)))
                elif kind == "done":
                    out.append(sse(self.chunk(k, "", data)))
                else:
                    out.append(sse(data.body()))
            yield "".join(out)
        if self.c.include_usage:
            yield sse({**self.base([]), "usage": self.usage()})
        yield "data: [DONE]\n\n"

    async def collect(self, channel: Channel) -> dict:
        """The stream's events collected into one completion object."""
        c = self.c
        texts = {k: "" for k in range(len(self.jobs))}
        reasons = {k: "length" for k, job in enumerate(self.jobs) if job is None}
        async for events in step_events(self.state, self.jobs, channel):
            for kind, k, data in events:
                if kind == "text":
                    texts[k] += data
                elif kind == "done":
                    reasons[k] = data
                else:
                    raise data
        echo_lps = await self.prompt_logprobs(channel) if (c.echo and c.logprobs is not None) else None
        choices = []
        for k, job in enumerate(self.jobs):
            prefix = self.prefix(k)
            lp = None
            if c.logprobs is not None:
                lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                if echo_lps is not None:
                    self._add_prompt_logprobs(lp, k // c.n, echo_lps)
                if job is not None:
                    more = self._sample_logprobs(job, len(prefix), texts[k])
                    for key in lp:
                        lp[key] += more[key]
            choices.append({"text": prefix + texts[k], "index": k, "logprobs": lp, "finish_reason": reasons[k]})
        return {**self.base(choices), "usage": self.usage()}

    async def prompt_logprobs(self, channel: Channel) -> List[np.ndarray]:
        """The prompts' token log-probabilities (gpt2-score.py's), on a worker thread that stops between
        prompts when the request ends early; it waits for other scores and embeddings only until then."""
        state, full = self.state, self.full

        def compute(cancelled):
            acquire(state.tf_lock, channel.until, cancelled)
            try:
                out = [np.zeros(0, np.float32)] * len(full)
                for i, lp in state.scorer.score_token_lists(full):
                    out[i] = lp
                    if cancelled.is_set():
                        return None
                return out
            finally:
                state.tf_lock.release()

        return await channel.in_worker(compute)

    def _add_prompt_logprobs(self, lp: dict, p: int, echo_lps) -> None:
        enc = self.state.enc
        pos = 0
        for token, value in zip(self.full[p], echo_lps[p]):
            piece = enc.decode([token])
            lp["tokens"].append(piece)
            lp["token_logprobs"].append(float(value))
            lp["top_logprobs"].append(None)
            lp["text_offset"].append(pos)
            pos += len(piece)

    def _sample_logprobs(self, job, offset: int, text: str) -> dict:
        enc, k = self.state.enc, self.c.logprobs
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
