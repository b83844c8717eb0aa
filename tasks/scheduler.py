"""The one decoding loop: continuous batching over a decoder's row table.

    sch = Scheduler(decoder, enc, batch_size=16)
    sch.admit([Job(SampleRequest(ids, params, rng=rng, max_length=500))])
    while sch.busy:
        for job, kind, data in sch.step():   # ("text", piece) as text becomes final, ("done", None)
            ...

``gpt2-generate.py`` and ``gpt2-bulk.py generate`` drive it synchronously (``tasks.generate``), the
server from its decoding thread (``tasks.serving``): every policy of generation lives here once.
One ``step()``:

1. samples whose client went away (``Job.cancel``) leave;
2. one token is drawn for every row but the held ones (``Job.held``: a reader that has fallen behind,
   see ``tasks.serving.Engine.hold``) through the sampler chain (``tasks.sampling``; rows with the
   same settings are drawn together).  A held row keeps its place, its key/value cache and the logits
   of its next token, and draws nothing: released, it goes on as if it had never waited (its random
   generator untouched).  Held through ``PARK_AFTER`` steps, it is *parked*: the decoder sets its
   cache aside (``RowDecoder.park``), so that the steps of the others no longer compute it, and puts
   it back as it was once it is released.  A parked row keeps its place in ``batch_size``;
3. the text is assembled (byte tokens held until their character is complete) and each sample's
   end is decided: <|endoftext|> (never during its first ``min_length`` tokens), a stop string,
   ``max_length`` characters, ``max_tokens`` tokens;
4. a sample that ends empty is drawn again (as the original, up to ``RETRIES_FOR_EMPTY`` times);
   the others are done (event ``done``) and leave;
5. every remaining row that drew takes its token.  After the ``min_length``-th token a row is cut back to its
   context without its last token and continues with the token drawn (the original's quirk, see
   ``tasks.generate``); a row whose window of n_ctx tokens is full continues from its most recent
   n_ctx/2 tokens (the sliding window).

Every sample that ends (but a cancelled one) gives a ``done`` event; ``text`` events come only for
jobs with an ``on_event`` and ``text_events`` on, and carry only text that is final: never past ``max_length``, never text
that may still become the start of a stop string; their pieces concatenate to the finished text.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .sampling import Rows, SamplingParams, sample
from .text import StopMatcher, TextAssembler, cut_at_stop

RETRIES_FOR_EMPTY = 8

#: Steps a held row is still computed before it is parked.  A decoder that computes every row reads
#: each held row's whole key/value cache at every step (its attention), and parking copies that cache
#: out and back once: about four steps' reading of it.  Parking after as many steps as it costs never
#: costs more than twice what the best choice made knowing how long the hold lasts would have.
PARK_AFTER = 4

#: With an ``aside`` executor, a new row whose prefill would take longer than this many decoding steps
#: (as this scheduler has measured both) is prefilled on the executor's thread while the other rows go
#: on, and joins them when it is done: a long prompt then holds every stream up by about this much at
#: most, instead of its whole prefill.
ASIDE_AFTER_STEPS = 4


class _Prefill:
    """Samples of one context being prefilled aside: their jobs and the executor's future."""

    __slots__ = ("jobs", "future", "tokens")

    def __init__(self, jobs, future, tokens: int):
        self.jobs, self.future, self.tokens = jobs, future, tokens


@dataclass
class SampleRequest:
    """One sample to generate.  ``ids``: the context's tokens as the model sees them (already cut
    to n_ctx/2, see ``tasks.text.context_ids``)."""

    ids: List[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    rng: Optional[np.random.Generator] = None
    max_tokens: Optional[int] = None  # None: no token budget
    max_length: Optional[int] = None  # characters; None: no limit
    stop: Tuple[str, ...] = ()
    logprobs: Optional[int] = None    # None: none; k: the chosen token's and the k most likely


class Job:
    """A sample being generated.  Read ``text``, ``tokens``, ``finish_reason`` once ``done``.

    ``on_event(job, kind, data)`` is how a front end hears of it (``deliver`` of the driver decides
    when); ``tag`` is the front end's own (the CLI's context and sample numbers)."""

    def __init__(self, request: SampleRequest, on_event: Optional[Callable[["Job", str, object], None]] = None,
                 tag=None):
        self.request = request
        self.on_event = on_event
        self.tag = tag
        self.rng = request.rng if request.rng is not None else np.random.default_rng()
        self.cancelled = False
        self.held = False   # a front end's reader is behind: draw nothing for now (see the module)
        #: whether ``on_event`` hears ``text`` events; a front end that uses only the finished ``text``
        #: (a non-streaming answer) sets False, and hears of the sample only when it is ``done``
        self.text_events = True
        self.done = False
        self.attempt = 0
        self.text = ""
        self.tokens: List[int] = []       # tokens of the final attempt (without the ending <|endoftext|>)
        self.drawn = 0                    # every token drawn, retries included
        self.logprobs: List[Tuple[int, float, List[Tuple[int, float]]]] = []
        #: with logprobs: the characters of the sample's text once each entry of ``logprobs`` was taken (byte
        #: tokens add none until their character is whole); the text released so far covers the entries whose
        #: end is at most its length
        self.logprob_ends: List[int] = []
        self.finish_reason: Optional[str] = None
        self.submitted = time.monotonic()
        self.first_token_at: Optional[float] = None

    def cancel(self) -> None:
        """Stop this sample: its row is freed at the next step (no more events)."""
        self.cancelled = True


@dataclass
class GenerationStats:
    """What a scheduler has done so far (for --verbose, the server's metrics and benchmarks)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    tokens: int = 0           # tokens drawn
    decode_seconds: float = 0.0
    steps: int = 0
    prefills_aside: int = 0   # contexts prefilled beside the steps (see ``ASIDE_AFTER_STEPS``)

    def line(self) -> str:
        def rate(n, s):
            return f"{n / s:.1f} tokens/s" if s > 0 else "-"
        return (f"prefill: {self.prefill_tokens} tokens in {self.prefill_seconds:.2f} s "
                f"({rate(self.prefill_tokens, self.prefill_seconds)}); decoding: {self.tokens} tokens in "
                f"{self.decode_seconds:.2f} s ({rate(self.tokens, self.decode_seconds)})")


class _Row:
    __slots__ = ("job", "assembler", "window", "history", "steps", "sent", "stops", "held_steps", "parked")

    def __init__(self, job: Job, enc):
        job.tokens = []
        job.logprobs = []
        job.logprob_ends = []
        self.job = job
        self.assembler = TextAssembler(enc)
        self.window = list(job.request.ids)   # what the model sees
        self.history = list(job.request.ids)  # the context and every token drawn (the chain's view)
        self.steps = 0
        self.sent = 0                          # characters of text passed on
        self.stops = StopMatcher(job.request.stop) if job.request.stop else None
        self.held_steps = 0                    # steps in a row this one was held through
        self.parked = None                     # while parked: (the decoder's Parked, its next logits)


Event = Tuple[Job, str, object]


class Scheduler:
    """Continuous batching of ``Job``s over one decoder (see the module).  Not thread-safe: one
    driver calls ``admit`` and ``step``."""

    def __init__(self, decoder, enc, batch_size: int = 16, stats: Optional[GenerationStats] = None,
                 aside=None):
        """``aside``: a ``concurrent.futures.Executor`` for long prefills beside the steps (see
        ``ASIDE_AFTER_STEPS``), used when the decoder can (``RowDecoder.aside``); a driver that sleeps while
        nothing is ``ready`` sets ``on_prefilled`` to be woken (it is called on the executor's thread)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.aside = aside if aside is not None and decoder.aside else None
        self.prefilling: List[_Prefill] = []
        self.on_prefilled: Optional[Callable[[], None]] = None
        self._inline = [0, 0.0]  # tokens and seconds of the prefills made in the table (for the choice)
        self.decoder = decoder
        self.enc = enc
        self.n_ctx = decoder.hparams.n_ctx
        self.batch_size = batch_size
        self.stats = stats if stats is not None else GenerationStats()
        self.active: List[_Row] = []
        self.parked: List[_Row] = []          # held rows set aside (see the module)
        self.retrying: Deque[Job] = deque()   # samples that ended empty, drawn again first
        self._logits = np.empty((0, decoder.hparams.n_vocab), np.float32)
        self._tokens = np.zeros(0, np.int64)
        self._fed = True  # whether the rows have taken their last drawn token
        decoder.clear()

    # -- the driver's side ---------------------------------------------------------------------

    @property
    def free(self) -> int:
        """How many new samples ``admit`` takes now."""
        return max(0, self.batch_size - self.occupied - len(self.retrying))

    @property
    def occupied(self) -> int:
        """Rows taken: the samples being decoded, parked ones and those being prefilled aside included."""
        return len(self.active) + len(self.parked) + sum(len(p.jobs) for p in self.prefilling)

    @property
    def busy(self) -> bool:
        return bool(self.active or self.parked or self.prefilling or self.retrying)

    @property
    def ready(self) -> bool:
        """Whether ``step`` has work: a row to draw for or to drop, a sample to draw again or one prefilled
        aside to put in (with every row held, and every prefill aside under way, it has none)."""
        return bool(self.retrying) or any(p.future.done() for p in self.prefilling) \
            or any(not row.job.held or row.job.cancelled for row in self.active + self.parked)

    def admit(self, jobs: Sequence[Job] = ()) -> None:
        """Start these samples now (after any that are drawn again); at most ``free`` of them."""
        if len(jobs) > self.free:
            raise ValueError(f"{len(jobs)} samples for {self.free} free rows")
        joining = [job for job in list(self.retrying) + list(jobs) if not job.cancelled]
        for job in self.retrying:
            if job.cancelled:
                self._finish(None, job, "", "cancelled", [])
        self.retrying.clear()
        if not joining:
            return
        aside = self._to_prefill_aside(joining)
        if aside:
            joining = [job for job in joining if id(job) not in aside]
            self._prefill_aside(list(aside.values()))
        if not joining:
            return
        t0 = time.perf_counter()
        fresh = self.decoder.add([id(job) for job in joining], [job.request.ids for job in joining])
        seconds = time.perf_counter() - t0
        tokens = sum(len(job.request.ids) for job in joining)
        self.stats.prefill_seconds += seconds
        self.stats.prefill_tokens += tokens
        self._inline[0] += tokens
        self._inline[1] += seconds
        self._logits = np.concatenate([self._logits, fresh]) if self.active else fresh
        self.active += [_Row(job, self.enc) for job in joining]

    def _to_prefill_aside(self, joining: List[Job]) -> Dict[int, Job]:
        """The joining samples to prefill aside (by id): with an executor, while other rows decode, those
        whose prefill would take longer than ``ASIDE_AFTER_STEPS`` steps by this scheduler's measurements
        (none before it has any)."""
        if self.aside is None or not self.active or not self._inline[0] or not self.stats.steps:
            return {}
        per_token = self._inline[1] / self._inline[0]
        limit = ASIDE_AFTER_STEPS * self.stats.decode_seconds / self.stats.steps
        return {id(job): job for job in joining if len(job.request.ids) * per_token > limit}

    def _prefill_aside(self, jobs: List[Job]) -> None:
        groups: Dict[tuple, List[Job]] = {}  # samples of one context: one prefill, put in once each
        for job in jobs:
            groups.setdefault(tuple(job.request.ids), []).append(job)
        for ids, group in groups.items():
            future = self.aside.submit(self._timed_prefill, ids)
            self.prefilling.append(_Prefill(group, future, len(ids)))
            future.add_done_callback(self._prefilled)

    def _timed_prefill(self, ids: tuple):
        t0 = time.perf_counter()
        kept, logits = self.decoder.prefill_aside(ids)
        return kept, logits, time.perf_counter() - t0

    def _prefilled(self, _future) -> None:
        if self.on_prefilled is not None:
            self.on_prefilled()

    def _join_prefilled(self, events: List[Event]) -> None:
        """Samples whose prefill aside is done join the rows (a cancelled one ends with no row); a failed
        prefill fails this step (its samples stay listed, so that ``abort`` returns them)."""
        for p in [p for p in self.prefilling if p.future.done()]:
            kept, logits, seconds = p.future.result()
            self.prefilling.remove(p)
            self.stats.prefill_seconds += seconds
            self.stats.prefill_tokens += p.tokens
            self.stats.prefills_aside += 1
            self.decoder.prefilled_tokens += p.tokens
            rows = []
            for job in p.jobs:
                if job.cancelled:
                    self._finish(None, job, "", "cancelled", events)
                    continue
                self.decoder.unpark(id(job), kept)
                rows.append(_Row(job, self.enc))
            if rows:
                fresh = np.repeat(logits[None], len(rows), axis=0)
                self._logits = np.concatenate([self._logits, fresh]) if self.active else fresh
                self.active += rows

    def abort(self) -> List[Job]:
        """Forget every sample (after a failed step): the jobs that were in progress."""
        jobs = [row.job for row in self.active + self.parked] + [j for p in self.prefilling for j in p.jobs] \
            + list(self.retrying)
        self.active = []
        self.parked = []
        self.prefilling = []  # (a prefill under way ends on its own; nothing takes its result)
        self.retrying.clear()
        self._logits = np.empty((0, self.decoder.hparams.n_vocab), np.float32)
        self.decoder.clear()
        return jobs

    def step(self, early: Optional[Callable[[List[Event]], None]] = None) -> List[Event]:
        """One token for every row that is not held; the events it produced (see the module).  With
        ``early``, the events are handed to it as soon as the tokens are drawn, before the rows take them
        (the decoder's step, most of a step's time): a sample that ends, and a stream's new text, reach
        their reader one decoder step sooner; what is returned is then only what came after (nothing)."""
        events: List[Event] = []
        if self.retrying:
            self.admit([])
        self._join_prefilled(events)
        self._drop_cancelled(events)
        self._unpark()
        moving = [b for b, row in enumerate(self.active) if not row.job.held]
        if not moving:
            return events
        if len(moving) < len(self.active) and self.decoder.parking:
            self._park()
            moving = [b for b, row in enumerate(self.active) if not row.job.held]
        t0 = time.perf_counter()
        every = len(moving) == len(self.active)
        rows = self.active if every else [self.active[b] for b in moving]
        logits = self._logits if every else self._logits[moving]
        tokens = self._draw(rows, logits)
        self.stats.tokens += len(rows)
        self.stats.steps += 1
        finished: Dict[int, Tuple[str, str]] = {}
        for i, row in enumerate(rows):
            end = self._take(row, int(tokens[i]), logits[i], events)
            if end is not None:
                finished[i] = end
        if finished:
            for i, (text, reason) in finished.items():
                row = rows[i]
                if text == "" and row.job.attempt < RETRIES_FOR_EMPTY:
                    row.job.attempt += 1  # the original draws an empty sample again
                    self.retrying.append(row.job)
                else:
                    self._finish(row, row.job, text, reason, events)
            self.decoder.remove([id(rows[i].job) for i in finished])
            ended = {id(rows[i]) for i in finished}
            keep = [b for b, row in enumerate(self.active) if id(row) not in ended]
            self.active = [self.active[b] for b in keep]
            if not every:
                self._logits = self._logits[keep]
            left = [i for i in range(len(rows)) if i not in finished]
            rows = [rows[i] for i in left]
            tokens = tokens[left]
        if early is not None and events:
            early(events)
            events = []
        if len(rows) == len(self.active):  # every row drew (or none is left)
            self._logits = self._feed(rows, tokens) if rows else np.empty((0, logits.shape[1]), np.float32)
        elif rows:
            place = {id(row): b for b, row in enumerate(self.active)}
            self._logits[[place[id(row)] for row in rows]] = self._feed(rows, tokens)
        self.stats.decode_seconds += time.perf_counter() - t0
        return events

    # -- inside a step -------------------------------------------------------------------------

    def _park(self) -> None:
        """Count the held rows' steps; set aside those held through ``PARK_AFTER`` steps."""
        go = set()
        for b, row in enumerate(self.active):
            if row.job.held:
                row.held_steps += 1
                if row.held_steps > PARK_AFTER:
                    go.add(b)
            else:
                row.held_steps = 0
        if not go:
            return
        for b in sorted(go):
            row = self.active[b]
            row.parked = (self.decoder.park(id(row.job)), self._logits[b].copy())
            self.parked.append(row)
        keep = [b for b in range(len(self.active)) if b not in go]
        self.active = [self.active[b] for b in keep]
        self._logits = self._logits[keep]

    def _unpark(self) -> None:
        """Parked rows whose reader caught up rejoin the steps, exactly as they were."""
        back, still = [], []
        for row in self.parked:  # one look at each (a front end's thread may hold it again meanwhile)
            (still if row.job.held else back).append(row)
        if not back:
            return
        self.parked = still
        for row in back:
            kept, _ = row.parked
            self.decoder.unpark(id(row.job), kept)
            row.held_steps = 0
        rejoining = np.stack([row.parked[1] for row in back])
        self._logits = np.concatenate([self._logits, rejoining]) if self.active else rejoining
        for row in back:
            row.parked = None
        self.active += back

    def _drop_cancelled(self, events: List[Event]) -> None:
        for row in [row for row in self.parked if row.job.cancelled]:  # nothing of theirs in the decoder
            self.parked.remove(row)
            self._finish(row, row.job, row.assembler.text, "cancelled", events)
        gone = [b for b, row in enumerate(self.active) if row.job.cancelled]
        if not gone:
            return
        for b in gone:
            row = self.active[b]
            self._finish(row, row.job, row.assembler.text, "cancelled", events)
        self.decoder.remove([id(self.active[b].job) for b in gone])
        keep = [b for b in range(len(self.active)) if b not in set(gone)]
        self.active = [self.active[b] for b in keep]
        self._logits = self._logits[keep]

    def _draw(self, rows: List[_Row], logits: np.ndarray) -> np.ndarray:
        """One token for each of ``rows`` (``logits`` theirs) through the sampler chain, rows with the same
        settings together."""
        groups: Dict[SamplingParams, List[int]] = {}
        for b, row in enumerate(rows):
            groups.setdefault(row.job.request.params, []).append(b)
        tokens = np.empty(len(rows), np.int64)
        for params, idx in groups.items():
            group = [rows[b] for b in idx]
            view = Rows(logits[idx], [r.history for r in group], [r.steps for r in group],
                        [r.job.rng for r in group], self.enc.eos_id, enc=self.enc)
            tokens[idx] = sample(view, params)
        return tokens

    def _take(self, row: _Row, token: int, logits_row: np.ndarray, events: List[Event]):
        """Row ``row`` drew ``token``: its text and whether it ends ((final text, reason) or None)."""
        job, req = row.job, row.job.request
        row.steps += 1
        job.drawn += 1
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        if token == self.enc.eos_id:
            row.assembler.finish()
            return self._final(row), "stop"
        if req.logprobs is not None:
            job.logprobs.append(_logprobs(logits_row, token, req.logprobs))
        piece = row.assembler.push(token)
        if req.logprobs is not None:
            job.logprob_ends.append(len(row.assembler.text))
        job.tokens.append(token)
        row.history.append(token)
        if row.stops is not None and piece:
            row.stops.feed(piece)
        text = row.assembler.text
        if (row.stops is not None and row.stops.found) \
                or (req.max_length is not None and len(text) >= req.max_length) \
                or (req.max_tokens is not None and len(job.tokens) >= req.max_tokens):
            if row.stops is not None:
                row.stops.feed(row.assembler.finish())
            else:
                row.assembler.finish()
            return self._final(row), "stop" if row.stops is not None and row.stops.found else "length"
        if piece and job.on_event is not None and job.text_events:
            if req.max_length is not None:
                text = text[:req.max_length]
            safe = len(text) - (row.stops.held if row.stops is not None else 0)
            if safe > row.sent:
                events.append((job, "text", text[row.sent:safe]))
                row.sent = safe
        return None

    def _final(self, row: _Row) -> str:
        req = row.job.request
        text = row.assembler.text
        if req.max_length is not None:
            text = text[:req.max_length]
        return cut_at_stop(text, req.stop)[0] if req.stop else text

    def _finish(self, row: Optional[_Row], job: Job, text: str, reason: str, events: List[Event]) -> None:
        job.text = text
        job.finish_reason = reason
        job.done = True
        if job.cancelled:
            return
        sent = row.sent if row is not None else 0
        if text[sent:] and job.on_event is not None and job.text_events:
            events.append((job, "text", text[sent:]))
        events.append((job, "done", None))

    def _feed(self, rows: List[_Row], tokens: np.ndarray) -> np.ndarray:
        """Each of ``rows`` takes its token; the logits that follow [len(rows), n_vocab]."""
        dec = self.decoder
        half = self.n_ctx // 2
        stepping, stepped, restarting = [], [], []
        for b, row in enumerate(rows):
            token = int(tokens[b])
            key = id(row.job)
            min_length = row.job.request.params.min_length
            if min_length and row.steps == min_length:
                # The original's second sampling loop starts from the cache of the context
                # without its last token, then feeds the last token drawn.
                base = len(row.job.request.ids) - 1
                dec.truncate(key, base)
                row.window = row.window[:base] + [token]
            else:
                row.window.append(token)
            if dec.length(key) >= self.n_ctx:
                row.window = row.window[-half:]  # sliding window: the most recent n_ctx/2 tokens
                restarting.append(b)
            else:
                stepping.append(b)
                stepped.append(token)
        logits = np.empty((len(rows), self._logits.shape[1]), np.float32)
        if stepping:
            logits[stepping] = dec.step([id(rows[b].job) for b in stepping], stepped)
        for b in restarting:
            row = rows[b]
            logits[b] = dec.replace(id(row.job), row.window)
        return logits


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
