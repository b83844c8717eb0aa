"""POST /v1/completions: one path for streaming and non-streaming answers.

A request is read and checked (every limit, the capacity of the engine) before any sample is built;
its prompts are encoded and its samples built on a worker thread; its samples are submitted to the
engine; ``step_events`` turns the engine's events into the completion's events, one list per decoding
step.  A stream writes each list as Server-Sent Events; a non-streaming answer is the same events
collected.  The request's channel ends it early: --timeout (504), the server shutting down (503), the
client hanging up (its samples are cancelled at once)."""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, List, Optional, Tuple

import numpy as np
from fastapi import APIRouter, Request

from tasks.sampling import SamplingParams
from tasks.text import cut_context
from tasks.serving import EngineStopped, QueueFull, SampleRequest

from .. import requests as rq
from ..body import read_json
from ..controls import sampling_params
from ..requests import ApiError
from ..responses import EventStream, sse
from ..state import DISCONNECT, SHUTDOWN, TIMEOUT, Channel, State
from . import check_model, state_of

DEFAULT_MAX_TOKENS = 16
MAX_N = 128
#: the most top_logprobs of /v1/completions' logprobs (OpenAI's limit)
MAX_LOGPROBS = 5
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
    if body.get("suffix") not in (None, ""):
        raise rq.bad("suffix", "is not supported")
    max_tokens = rq.integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 0, MAX_TOKENS)
    max_length = rq.integer(body, "max_length", None, 0, MAX_TOKENS)
    params = sampling_params(body, state.hparams, state.enc)
    seed = rq.integer(body, "seed", None, 0, 2 ** 64 - 1)
    stop = rq.stops(body, MAX_STOP_CHARS)
    stream = rq.boolean(body, "stream", False)
    echo = rq.boolean(body, "echo", False)
    logprobs = rq.integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    include_usage = stream_usage(body, stream)
    return Completion(prompts, n, max_tokens, max_length, params, seed, stop, stream, echo, logprobs, include_usage)


def stream_usage(body: dict, stream: bool) -> bool:
    """stream_options.include_usage (only with stream)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream or not isinstance(options, dict):
        raise rq.bad("stream_options", "must be an object, and only with stream")
    return rq.boolean(options, "include_usage", False)


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


def build(state: State, c: Completion, cancelled) -> Tuple[list, List[SampleRequest]]:
    """Each prompt's token ids (a list when they are scored, else a list or an int32 array), and the
    samples: requests[prompt * n + i] (on a worker thread, which stops when ``cancelled`` is set)."""
    hp, enc = state.hparams, state.enc
    full, requests = [], []
    scored = c.echo and c.logprobs is not None  # the prompts' tokens are scored and listed one by one
    try:  # long prompts: in the encoder's own process (state.encoder_pool), off this process's lock; as
        # arrays, so that only what is used becomes Python ints (the context's tail, or a scored prompt)
        encoded = state.encoder_pool.encode_many([p for p in c.prompts if not isinstance(p, list)], cancelled,
                                                 arrays=True)
    except ValueError as e:
        raise rq.bad("prompt", str(e)) from None
    if encoded is None:
        return [], []
    encoded = iter(encoded)
    for j, item in enumerate(c.prompts):
        if cancelled.is_set():
            return [], []
        ids = list(item) if isinstance(item, list) else next(encoded)
        full.append(ids.tolist() if scored and not isinstance(ids, list) else ids)
        if not c.samples:
            continue
        context = cut_context(ids, hp.n_ctx, enc.eos_id)  # as gpt2-generate.py: the last n_ctx/2 tokens
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
        # a non-streaming answer reads each sample's finished text: no event per token
        return state.engine.submit_many(requests, channel.on_event, text_events=c.stream)
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
                    if not job.text_events:  # (then the time its first token was drawn)
                        state.metrics.first_token(job)
                    remaining -= 1
                    out.append(("done", k, job.finish_reason))
                else:
                    remaining -= 1
                    out.append(("error", k, state.fault(data)))
            if out:
                yield out
    finally:
        state.engine.cancel(jobs)


@router.post("/v1/completions")
async def completions(request: Request):
    state = state_of(request)
    t0 = time.monotonic()
    body = await read_json(request, state.config)
    c = parse(state, body)
    return await serve(request, state, c, t0, "/v1/completions", _Answer)


async def serve(request: Request, state: State, c: Completion, t0: float, route: str, answer_class):
    """Build, submit and answer (a stream, or one object) a parsed request: ``answer_class(state, c, jobs,
    full, prompt_lps)`` has ``stream(channel)`` and ``collect(channel)``."""
    check_capacity(state, c)
    channel = Channel(state, t0 + state.config.timeout, request.receive)
    streaming = False
    try:
        full, requests = await channel.in_worker(lambda cancelled: build(state, c, cancelled))
        prompt_lps = None
        if c.echo and c.logprobs is not None:  # before the samples start: the worker's wait takes no events
            prompt_lps = await prompt_logprobs(state, full, c.logprobs, channel)
        jobs = submit(state, c, requests, channel)
        answer = answer_class(state, c, jobs, full, prompt_lps)
        if c.stream:
            streaming = True

            def close():  # however the stream ended -- also cut while it still sent an echoed prompt,
                state.engine.cancel(jobs)  # before its events were ever read: its samples end with it
                channel.close()
                state.metrics.latency(route, time.monotonic() - t0)

            return EventStream(answer.stream(channel), lambda: channel.until, close, stall=state.config.read_timeout)
        result = await answer.collect(channel)
        state.metrics.latency(route, time.monotonic() - t0)
        return result
    finally:
        if not streaming:
            channel.close()


async def prompt_logprobs(state: State, full: List[List[int]], k: int, channel: Channel) -> list:
    """For each prompt: (its tokens' log-probabilities, gpt2-score.py's; the k most likely (id, log-probability)
    at each of its positions, or None when k is 0), on the server's forward worker, which stops between
    prompts when the request ends early; it waits for other scores and embeddings only until then."""

    def forward(cancelled):  # on the server's forward worker (state.ForwardWorker)
        out = [(np.zeros(0, np.float32), None)] * len(full)
        for i, lp in state.scorer.score_token_lists(full, stop=cancelled.is_set):
            out[i] = (lp, None)
        if cancelled.is_set():  # (a long prompt stops between its windows)
            return None
        if k > 0:
            for i, ids in enumerate(full):
                top = prompt_top(state.model, state.enc.eos_id, ids, k, stop=cancelled.is_set)
                if top is None:
                    return None
                out[i] = (out[i][0], top)
        return out

    return await channel.in_worker(lambda cancelled: state.forward.run(forward, channel.until, cancelled))


def prompt_top(m, eos: int, ids: List[int], k: int,
               stop: Optional[Callable[[], bool]] = None) -> Optional[List[List[Tuple[int, float]]]]:
    """The k most likely (id, log-probability) before each token of ``ids`` (after <|endoftext|>, over the
    scorer's sliding windows when the prompt is longer than the context); None as soon as ``stop()``
    says so (asked before each window)."""
    from tasks.score import windows  # TensorFlow: only when asked

    seq = [eos, *ids]
    out: List[List[Tuple[int, float]]] = []
    for start, end, first in windows(len(seq), m.hparams.n_ctx):
        if stop is not None and stop():
            return None
        logits = m.logits([seq[start:end]])[0]
        for pos in range(first, end):
            out.append(top_logprobs(logits[pos - start - 1], k))
    return out


def top_logprobs(row: np.ndarray, k: int) -> List[Tuple[int, float]]:
    """The k most likely tokens of a logits row and their log-probabilities, most likely first."""
    row = np.asarray(row, np.float64)
    peak = row.max()
    lse = peak + math.log(np.exp(row - peak).sum())
    idx = np.argpartition(row, -k)[-k:]
    idx = idx[np.argsort(-row[idx], kind="stable")]
    return [(int(i), float(row[i] - lse)) for i in idx]


class Cursor:
    """Which of a sample's token log-probabilities (``job.logprobs``) the text released so far covers: an
    entry once the text reaches its end (``job.logprob_ends``), so a stream and a collected answer give the
    same entries, and a token cut by a stop string or max_length is left out."""

    def __init__(self):
        self.index = 0     # entries given
        self.released = 0  # characters of text released

    def advance(self, job, chars: int, enc) -> List[Tuple[str, int, float, list, int]]:
        """``chars`` more characters were released: the entries they complete, as (piece, token,
        log-probability, top [(id, log-probability)], offset of the token in the sample's text)."""
        self.released += chars
        out = []
        entries, ends = job.logprobs, job.logprob_ends  # a sample drawn again gets new lists
        count = min(len(entries), len(ends))  # the decoding thread appends an entry first, then its end
        while self.index < count and ends[self.index] <= self.released:
            token, lp, top = entries[self.index]
            start = ends[self.index - 1] if self.index else 0
            out.append((enc.decode([token]), token, lp, top, start))
            self.index += 1
        return out


class _Answer:
    """The completion object's parts: its id, the choices' texts and log-probabilities, usage."""

    def __init__(self, state: State, c: Completion, jobs: list, full: List[List[int]], prompt_lps):
        self.state, self.c, self.jobs, self.full, self.prompt_lps = state, c, jobs, full, prompt_lps
        self.id = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.cursors = [Cursor() for _ in jobs]

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

    def chunk(self, k: int, text: str, finish_reason: Optional[str], logprobs=None) -> dict:
        return self.base([{"text": text, "index": k, "logprobs": logprobs, "finish_reason": finish_reason}])

    def _empty_lp(self) -> Optional[dict]:
        if self.c.logprobs is None:
            return None
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _start_lp(self, k: int) -> Optional[dict]:
        """A choice's log-probabilities before its sample: the echoed prompt's, when asked."""
        lp = self._empty_lp()
        if lp is not None and self.prompt_lps is not None:
            self._add_prompt_logprobs(lp, k // self.c.n)
        return lp

    def _add_sample_lp(self, lp: dict, k: int, chars: int) -> None:
        enc, want = self.state.enc, self.c.logprobs
        job, offset = self.jobs[k], len(self.prefix(k))
        for piece, _, value, top, pos in self.cursors[k].advance(job, chars, enc):
            lp["tokens"].append(piece)
            lp["token_logprobs"].append(value)
            lp["top_logprobs"].append({enc.decode([t]): v for t, v in top} if want > 0 else None)
            lp["text_offset"].append(offset + pos)

    async def stream(self, channel: Channel) -> AsyncIterator[str]:
        for k, job in enumerate(self.jobs):
            first = self.prefix(k)
            lp = self._start_lp(k)
            if job is None or first or (lp is not None and lp["tokens"]):
                yield sse(self.chunk(k, first, "length" if job is None else None, lp))
        async for events in step_events(self.state, self.jobs, channel):
            out = []
            for kind, k, data in events:
                if kind == "text":
                    lp = self._empty_lp()
                    if lp is not None:
                        self._add_sample_lp(lp, k, len(data))
                    out.append(sse(self.chunk(k, data, None, lp)))
                elif kind == "done":
                    out.append(sse(self.chunk(k, "", data)))
                else:
                    out.append(sse(data.body()))
            yield "".join(out)
        if self.c.include_usage:
            yield sse({**self.base([]), "usage": self.usage()})
        yield "data: [DONE]\n\n"

    async def gather(self, channel: Channel) -> Tuple[dict, dict]:
        """Every sample's text and finish reason (by choice index), once all are done (the samples were
        submitted without text events: each one's finished text is read when it is done)."""
        texts = {k: "" for k in range(len(self.jobs))}
        reasons = {k: "length" for k, job in enumerate(self.jobs) if job is None}
        async for events in step_events(self.state, self.jobs, channel):
            for kind, k, data in events:
                if kind == "text":
                    texts[k] += data
                elif kind == "done":
                    texts[k] = self.jobs[k].text
                    reasons[k] = data
                else:
                    raise data
        return texts, reasons

    async def collect(self, channel: Channel) -> dict:
        """The stream's events collected into one completion object."""
        texts, reasons = await self.gather(channel)
        choices = []
        for k, job in enumerate(self.jobs):
            lp = self._start_lp(k)
            if lp is not None and job is not None:
                self._add_sample_lp(lp, k, len(texts[k]))
            choices.append({"text": self.prefix(k) + texts[k], "index": k, "logprobs": lp,
                            "finish_reason": reasons[k]})
        return {**self.base(choices), "usage": self.usage()}

    def _add_prompt_logprobs(self, lp: dict, p: int) -> None:
        enc = self.state.enc
        values, tops = self.prompt_lps[p]
        pos = 0
        for i, (token, value) in enumerate(zip(self.full[p], values)):
            piece = enc.decode([token])
            lp["tokens"].append(piece)
            lp["token_logprobs"].append(float(value))
            lp["top_logprobs"].append(None if tops is None else {enc.decode([t]): v for t, v in tops[i]})
            lp["text_offset"].append(pos)
            pos += len(piece)
