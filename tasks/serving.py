"""A generation engine for a server: one model, one decoding thread, requests joining a running batch.

    from tasks.serving import Engine, SampleRequest
    engine = Engine(m, enc, batch_size=16, max_queue=64)
    engine.start()
    job = engine.submit(SampleRequest(ids, params, max_tokens=16, stop=("。",), rng=rng), on_event)
    ...                       # on_event(job, "text", piece) ... on_event(job, "done", None), see ``deliver``
    job.cancel()              # the row is freed at the next step
    engine.stop()

Every sample is one row of the decoder (``model.decoder``).  The loop thread
takes waiting samples into the batch at every step (up to ``batch_size``
rows; with the TensorFlow decoder, whose rows join only together, when the
batch is empty), draws one token per row with that sample's own options
(``sampling.choose``), and feeds the tokens.  A finished or cancelled sample
leaves at once and its place goes to the next waiting one.

A sample is decoded exactly as ``tasks.generate.Generator`` decodes it
(min_length 0): the prompt's last n_ctx/2 tokens, <|endoftext|> for an
empty prompt, the sliding window of the most recent n_ctx/2 tokens when the
window of n_ctx is full, a sample that ends empty drawn again (up to 8
times) with the same random stream.  So a sample with the random stream
``SeedSequence([S, j, i])`` gives the text of sample i of context j of
``gpt2-generate.py --seed S`` with the same options.  Besides ``max_length``
(characters) a sample ends after ``max_tokens`` tokens, or before the first
occurrence of any of its ``stop`` strings (the stop string is not part of
the text); streamed text holds back what could still become a stop string.

Events are handed over once per step: the loop gathers every (job, kind,
data) of a step and calls ``engine.deliver(events)`` once, before it runs
the next decoding step (by default ``deliver`` calls each job's ``on_event``
on the loop thread).  A server sets ``deliver`` to one
``loop.call_soon_threadsafe`` per step: its event loop then wakes once per
step, not once per token per client, and takes the GIL from the decoding
thread that much less often.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence, Tuple

import numpy as np

from model import decoder as new_decoder

from .generate import RETRIES_FOR_EMPTY, TextAssembler, cut_at_stop, held_back
from .sampling import SamplingParams, choose


class QueueFull(Exception):
    """More samples wait than the engine's ``max_queue`` allows."""


class EngineStopped(Exception):
    """The engine no longer takes work."""


@dataclass
class SampleRequest:
    """One sample to generate.  ``ids``: the context's tokens as the model sees them
    (already cut to n_ctx/2, see ``Engine.context_ids``)."""

    ids: List[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    rng: Optional[np.random.Generator] = None
    max_tokens: Optional[int] = None  # None: no token budget
    max_length: Optional[int] = None  # characters; None: no limit
    stop: Tuple[str, ...] = ()
    logprobs: Optional[int] = None    # None: none; k: the chosen token's and the k most likely


def finish_text(text: str, max_length: Optional[int], stop: Sequence[str]) -> Tuple[str, bool]:
    """A sample's final text: cut to max_length characters, then before the first stop string."""
    if max_length is not None:
        text = text[:max_length]
    return cut_at_stop(text, stop)


class Job:
    """A sample being served.  Read ``text``, ``tokens``, ``finish_reason`` once done."""

    def __init__(self, request: SampleRequest, on_event: Callable[["Job", str, object], None]):
        self.request = request
        self.on_event = on_event
        self.rng = request.rng if request.rng is not None else np.random.default_rng()
        self.cancelled = False
        self.done = False
        self.attempt = 0
        self.text = ""
        self.tokens: List[int] = []       # tokens of the final attempt (without the ending <|endoftext|>)
        self.drawn = 0                    # every token drawn, retries included
        self.logprobs: List[Tuple[int, float, List[Tuple[int, float]]]] = []
        self.finish_reason: Optional[str] = None
        self.submitted = time.monotonic()
        self.first_token_at: Optional[float] = None

    def cancel(self) -> None:
        """Stop this sample: its row is freed at the next step (no more events)."""
        self.cancelled = True


class _Row:
    def __init__(self, job: Job, enc):
        self.job = job
        self.assembler = TextAssembler(enc)
        self.window = list(job.request.ids)
        self.steps = 0
        self.sent = 0  # characters of text passed to on_event
        job.tokens = []
        job.logprobs = []


class Engine:
    """One decoder and one thread decoding every submitted sample.  See the module's docstring."""

    def __init__(self, model, enc, batch_size: int = 16, max_queue: int = 256, engine: str = "auto",
                 decoder=None, quantize=None):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.enc = enc
        self.batch_size = batch_size
        self.max_queue = max_queue
        # rows: with --engine auto on a CPU, float32 batches of 4 or more rows decode with ONNX Runtime
        self.decoder = decoder if decoder is not None else new_decoder(model, engine, quantize=quantize,
                                                                       rows=batch_size)
        self._waiting: Deque[Job] = deque()
        self._active: List[_Row] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.tokens_generated = 0
        self.steps = 0
        self.failure: Optional[BaseException] = None
        self._recent: Deque[Tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.on_step: Optional[Callable[[int], None]] = None
        #: Called from the loop thread once per step with that step's events [(job, kind, data)].
        self.deliver: Callable[[List[Tuple[Job, str, object]]], None] = deliver_each
        self._events: List[Tuple[Job, str, object]] = []

    # -- outside the loop ------------------------------------------------------------------

    def context_ids(self, context: str) -> List[int]:
        """The tokens a sample continues: the last n_ctx/2 of the context (<|endoftext|> when empty)."""
        ids = self.enc.encode(context if context != "" else "<|endoftext|>")
        if not ids:
            ids = [self.enc.eos_id]
        return ids[-(self.model.hparams.n_ctx // 2):]

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="gpt2ja-decoding", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: SampleRequest, on_event: Callable[[Job, str, object], None]) -> Job:
        """Queue one sample; raises QueueFull or EngineStopped."""
        return self.submit_many([request], on_event)[0]

    def submit_many(self, requests: Sequence[SampleRequest], on_event) -> List[Job]:
        """Queue samples together (all or none): QueueFull when they would not fit in ``max_queue``."""
        jobs = [Job(r, on_event) for r in requests]
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            room = self.batch_size - len(self._active) + self.max_queue - len(self._waiting)
            if len(jobs) > room:
                raise QueueFull(f"{len(self._waiting)} samples are waiting (at most {self.max_queue})")
            self._waiting.extend(jobs)
            self._cv.notify()
        return jobs

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return len(self._active)

    def tokens_per_second(self, span: float = 5.0) -> float:
        """Tokens drawn per second over the last ``span`` seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= span]
        return sum(n for _, n in recent) / span if recent else 0.0

    def stop(self, cancel: bool = True, timeout: float = 10.0) -> None:
        """Stop taking work; cancel (or, with cancel False, finish) what is left; join the thread."""
        with self._cv:
            self._stopping = True
            if cancel:
                for job in self._waiting:
                    job.cancel()
                for row in self._active:
                    row.job.cancel()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug or out of memory: fail every job instead of hanging
            self.failure = e
            with self._cv:
                self._stopping = True
                jobs = [j for j in [r.job for r in self._active] + list(self._waiting) if not j.done]
                self._waiting.clear()
                self._active = []
            for job in jobs:
                job.finish_reason = "error"
                job.done = True
            events, self._events = self._events, []  # what the failed step had finished still goes out
            self.deliver(events + [(job, "error", e) for job in jobs])

    def _take(self) -> List[Job]:
        """Jobs joining now (blocks while there is nothing to do); [] and no rows: stop."""
        with self._cv:
            while True:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()
                if self._active and not self.decoder.joins_running:
                    return []
                joining = []
                while self._waiting and len(self._active) + len(joining) < self.batch_size:
                    job = self._waiting.popleft()
                    if not job.cancelled:
                        joining.append(job)
                if joining or self._active:
                    return joining
                if self._stopping:
                    return []
                self._cv.wait()

    def _loop(self) -> None:
        dec = self.decoder
        hp = self.model.hparams
        dec.clear()
        logits = np.empty((0, hp.n_vocab), np.float32)
        while True:
            joining = self._take()
            rows_now = self._active
            if not rows_now and not joining:
                return
            if joining:
                fresh = dec.add([job.request.ids for job in joining])
                new_rows = [_Row(job, self.enc) for job in joining]
                logits = np.concatenate([logits, fresh]) if rows_now else fresh
                with self._cv:
                    self._active = rows_now + new_rows
            active = self._active
            # Cancelled rows leave before drawing.
            keep = [b for b, row in enumerate(active) if not row.job.cancelled]
            if len(keep) < len(active):
                dec.keep(keep)
                logits = logits[keep]
                with self._cv:
                    self._active = active = [active[b] for b in keep]
                if not active:
                    logits = np.empty((0, hp.n_vocab), np.float32)
                    continue
            tokens, finished = self._draw(active, logits)
            now = time.monotonic()
            self.tokens_generated += len(active)
            self.steps += 1
            self._recent.append((now, len(active)))
            while self._recent and now - self._recent[0][0] > 60:
                self._recent.popleft()
            if self.on_step is not None:
                self.on_step(len(active))
            if finished:
                retry = []
                for b, reason in finished:
                    row = active[b]
                    job = row.job
                    text, _ = finish_text(row.assembler.text, job.request.max_length, job.request.stop)
                    if text == "" and reason != "cancelled" and job.attempt < RETRIES_FOR_EMPTY:
                        job.attempt += 1  # as the CLI: a sample that ends empty is drawn again
                        retry.append(job)
                        continue
                    self._finish(row, text, reason)
                gone = {b for b, _ in finished}
                keep = [b for b in range(len(active)) if b not in gone]
                dec.keep(keep)
                tokens = tokens[keep]
                with self._cv:
                    self._active = active = [active[b] for b in keep]
                    self._waiting.extendleft(reversed(retry))
                if not active:
                    logits = np.empty((0, hp.n_vocab), np.float32)
                    self._flush()
                    continue
            self._flush()  # the clients get this step's text while the next step runs
            logits = self._feed(dec, active, tokens)

    def _flush(self) -> None:
        if self._events:
            events, self._events = self._events, []
            self.deliver(events)

    def _finish(self, row: _Row, text: str, reason: str) -> None:
        job = row.job
        job.text = text
        job.finish_reason = reason
        job.done = True
        if text[row.sent:] and not job.cancelled:
            self._events.append((job, "text", text[row.sent:]))
        row.sent = len(text)
        if not job.cancelled:
            self._events.append((job, "done", None))

    def _draw(self, active: List[_Row], logits: np.ndarray):
        """One token for every row: (tokens, [(row index, finish reason)])."""
        eos = self.enc.eos_id
        tokens = np.zeros(len(active), dtype=np.int64)
        finished = []
        for b, row in enumerate(active):
            job = row.job
            req = job.request
            if job.cancelled:
                finished.append((b, "cancelled"))
                continue
            token = choose(logits[b], req.params, job.rng)
            row.steps += 1
            job.drawn += 1
            if job.first_token_at is None:
                job.first_token_at = time.monotonic()
            if req.logprobs is not None:
                job.logprobs.append(_logprobs(logits[b], token, req.logprobs))
            if token == eos:
                row.assembler.finish()
                if job.logprobs and req.logprobs is not None:
                    job.logprobs.pop()  # <|endoftext|> is not part of the text
                finished.append((b, "stop"))
                continue
            row.assembler.push(token)
            job.tokens.append(token)
            tokens[b] = token
            text = row.assembler.text
            reason = None
            if req.stop and cut_at_stop(text[max(0, row.sent - max(map(len, req.stop))):], req.stop)[1]:
                reason = "stop"
            elif req.max_length is not None and len(text) >= req.max_length:
                reason = "length"
            elif req.max_tokens is not None and len(job.tokens) >= req.max_tokens:
                reason = "length"
            if reason is not None:
                row.assembler.finish()
                finished.append((b, reason))
                continue
            self._stream(row)
        return tokens, finished

    def _stream(self, row: _Row) -> None:
        """Send the text that is final: not past max_length, not possibly the start of a stop string."""
        job = row.job
        req = job.request
        text = row.assembler.text
        if req.max_length is not None:
            text = text[:req.max_length]
        safe = len(text) - held_back(text, req.stop) if req.stop else len(text)
        if safe > row.sent:
            piece = text[row.sent:safe]
            row.sent = safe
            self._events.append((job, "text", piece))

    def _feed(self, dec, active: List[_Row], tokens: np.ndarray) -> np.ndarray:
        hp = self.model.hparams
        lengths = dec.lengths()
        stepping, restarting = [], []
        for b, row in enumerate(active):
            row.window.append(int(tokens[b]))
            if lengths[b] >= hp.n_ctx:
                row.window = row.window[-(hp.n_ctx // 2):]  # sliding window, as the CLI
                restarting.append(b)
            else:
                stepping.append(b)
        return dec.feed(tokens[stepping], stepping, restarting, [active[b].window for b in restarting])


def vector_batches(lengths: Sequence[int], max_tokens: int = 4096, max_batch: int = 64,
                   overhead: int = 64) -> List[List[int]]:
    """Batches (lists of indices) for the vectors of texts of these token counts, with the least padding.

    A forward pass costs about its padded tokens (rows x the longest row), plus a little per call
    (``overhead``, counted in tokens).  ``tasks.vectors.Vectorizer``'s greedy plan (sorted by length,
    batches filled up to ``max_tokens``) pads little over the 512 lines gpt2-transform.py gathers, but
    over the 100 texts of a typical request it pads half as much again (the golden texts, 100 at a
    time: 61.5 k padded tokens for 35.1 k real ones); this plan (the cheapest split of the sorted
    lengths into runs, by dynamic programming) pads 38.9 k.  Each batch holds at most ``max_batch``
    rows and ``max_tokens`` padded tokens (a single longer row goes alone).  The vectors do not
    depend on the batching (causal attention; right padding is never attended to).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    width = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[e]: the cheapest plan of the e shortest
    start = [0] * (n + 1)
    for e in range(1, n + 1):
        w = width[e - 1]
        for s in range(e - 1, max(-1, e - 1 - max_batch), -1):
            rows = e - s
            if rows > 1 and rows * w > max_tokens:
                break
            cost = best[s] + rows * w + overhead
            if cost < best[e]:
                best[e], start[e] = cost, s
    batches, e = [], n
    while e > 0:
        batches.append(order[start[e]:e])
        e = start[e]
    return batches[::-1]


def deliver_each(events: Sequence[Tuple[Job, str, object]]) -> None:
    """The default ``Engine.deliver``: each event to its job's ``on_event``, in order."""
    for job, kind, data in events:
        job.on_event(job, kind, data)


def _logprobs(row: np.ndarray, token: int, k: int) -> Tuple[int, float, List[Tuple[int, float]]]:
    """(token, its log-probability under the model, the k most likely (id, log-probability))."""
    row = np.asarray(row, np.float64)
    top = row.max()
    lse = top + math.log(np.exp(row - top).sum())
    best: List[Tuple[int, float]] = []
    if k > 0:
        idx = np.argpartition(row, -k)[-k:]
        idx = idx[np.argsort(-row[idx])]
        best = [(int(i), float(row[i] - lse)) for i in idx]
    return int(token), float(row[token] - lse), best
