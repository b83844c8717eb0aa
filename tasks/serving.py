"""A generation engine for a server: one model, one decoding thread over the one decoding loop.

    from tasks.serving import Engine, SampleRequest
    engine = Engine(m, enc, batch_size=16, max_queue=64)
    engine.start()
    job = engine.submit(SampleRequest(ids, params, max_tokens=16, stop=("。",), rng=rng), on_event)
    ...                       # on_event(job, "text", piece) ... on_event(job, "done", None), see ``deliver``
    engine.cancel([job])      # the row is freed at the next step
    engine.stop()

The thread drives ``tasks.scheduler.Scheduler`` -- the loop ``gpt2-generate.py`` runs too: at
every step it admits waiting samples into free rows (up to ``batch_size``), draws one token per
row through the sampler chain with that sample's own options, and feeds the tokens; a finished or
cancelled sample leaves at once and its place goes to the next waiting one.  So a sample is
decoded exactly as ``tasks.generate.Generator`` decodes it (the context cut, ``min_length``, the
sliding window, empty samples drawn again): a sample with the random stream
``SeedSequence([S, j, i])`` gives the text of sample i of context j of ``gpt2-generate.py --seed S``
with the same options.

Events are handed over once per step: the loop gathers every (job, kind, data) of a step and calls
``engine.deliver(events)`` once, as soon as the step's tokens are drawn -- before the decoder takes
them, so that a finished sample or a stream's text does not wait for that step of the others (by
default ``deliver`` calls each job's ``on_event`` on the loop thread).  A server sets ``deliver`` to one
``loop.call_soon_threadsafe`` per step: its event loop then wakes once per step, not once per
token per client, and takes the GIL from the decoding thread that much less often.  Samples
submitted with ``text_events=False`` (a non-streaming answer, which reads each finished text) add
nothing to a step's events until they end: a step of such samples only wakes the event loop
when one of them is done.

A front end whose reader falls behind (a stream's client that does not read) ``hold``s its jobs:
their rows draw nothing (no sampling, text or events) and keep their place until ``release`` (the
server's --read_timeout bounds the wait); held through a few steps, a row is parked -- its cache set
aside, out of the others' steps (``tasks.scheduler.PARK_AFTER``) -- and put back as it was when
released; while every row is held the thread sleeps.

A long prompt joining while others decode (one whose prefill would take longer than a few of their
steps, ``tasks.scheduler.ASIDE_AFTER_STEPS``) is prefilled on a thread of its own at a lower priority
(ONNX Runtime runs it beside the steps) and joins the batch when it is done: the others slow down a
little meanwhile instead of all waiting for its whole prefill.

A step that fails (out of memory, a bug) fails the samples of that step -- each gets an
``("error", exception)`` event -- is logged as one line on stderr, and the engine goes on serving
the next requests.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import time
from collections import deque
from typing import Callable, Deque, List, Optional, Sequence, Tuple

from model import decoder as new_decoder

from .batching import plan
from .scheduler import Job, SampleRequest, Scheduler
from .text import context_ids, cut_at_stop

__all__ = ["Engine", "Job", "SampleRequest", "QueueFull", "EngineStopped", "vector_batches", "deliver_each",
           "cut_at_stop"]


class QueueFull(Exception):
    """More samples wait than the engine's ``max_queue`` allows."""


class EngineStopped(Exception):
    """The engine no longer takes work."""


Event = Tuple[Job, str, object]


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
        self.decoder = decoder if decoder is not None else new_decoder(model, engine, quantize=quantize,
                                                                       rows=batch_size)
        self._aside = None
        if self.decoder.aside:  # long prefills beside the steps, on a thread at a lower priority
            self._aside = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gpt2ja-prefill",
                                                                initializer=_lower_this_thread)
        self.scheduler = Scheduler(self.decoder, enc, batch_size, aside=self._aside)
        self.scheduler.on_prefilled = self._wake
        self._waiting: Deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.failure: Optional[BaseException] = None
        self.faults = 0  # steps that failed (and were survived)
        self._recent: Deque[Tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.on_step: Optional[Callable[[int], None]] = None
        #: Called from the loop thread once per step with that step's events [(job, kind, data)].
        self.deliver: Callable[[List[Event]], None] = deliver_each

    # -- outside the loop ------------------------------------------------------------------

    def context_ids(self, context: str) -> List[int]:
        """The tokens a sample continues: the last n_ctx/2 of the context (<|endoftext|> when empty)."""
        return context_ids(self.enc, context, self.model.hparams.n_ctx)

    @property
    def tokens_generated(self) -> int:
        return self.scheduler.stats.tokens

    @property
    def steps(self) -> int:
        return self.scheduler.stats.steps

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="gpt2ja-decoding", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: SampleRequest, on_event: Callable[[Job, str, object], None]) -> Job:
        """Queue one sample; raises QueueFull or EngineStopped."""
        return self.submit_many([request], on_event)[0]

    def submit_many(self, requests: Sequence[SampleRequest], on_event, text_events: bool = True) -> List[Job]:
        """Queue samples together (all or none): QueueFull when they would not fit in ``max_queue``;
        OptionError for a ``min_length`` the model's context cannot hold.  ``text_events`` False: only
        ``done`` (or ``error``) events, for a caller that reads the finished ``job.text`` (a non-streaming
        answer: no event, and no wake-up of the caller, per token)."""
        for r in requests:
            r.params.check_model(self.model.hparams)
        jobs = [Job(r, on_event) for r in requests]
        for job in jobs:
            job.text_events = text_events
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            busy = self.scheduler.occupied + len(self.scheduler.retrying)
            room = self.batch_size - busy + self.max_queue - len(self._waiting)
            if len(jobs) > room:
                raise QueueFull(f"{len(self._waiting)} samples are waiting (at most {self.max_queue})")
            self._waiting.extend(jobs)
            self._cv.notify()
        return jobs

    def hold(self, job: Job) -> None:
        """Draw nothing more for ``job`` until ``release``: its reader is behind (a stream whose client
        does not take what it is sent).  The row keeps its place and goes on as if it had never waited."""
        job.held = True

    def release(self, jobs: Sequence[Job]) -> None:
        """Let held jobs draw again."""
        with self._cv:
            for job in jobs:
                job.held = False
            self._cv.notify()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def cancel(self, jobs: Sequence[Optional[Job]]) -> None:
        """Cancel these jobs (None entries are skipped): they leave at the loop's next step, which runs
        even while every other row is held."""
        with self._cv:
            for job in jobs:
                if job is not None:
                    job.cancel()
            self._cv.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return self.scheduler.occupied

    @property
    def held_rows(self) -> int:
        """Rows held because their reader is behind (see ``hold``)."""
        sch = self.scheduler
        return sum(row.job.held for row in list(sch.active) + list(sch.parked))

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
                for row in list(self.scheduler.active) + list(self.scheduler.parked):
                    row.job.cancel()
                for p in list(self.scheduler.prefilling):
                    for job in p.jobs:
                        job.cancel()
                for job in list(self.scheduler.retrying):
                    job.cancel()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._aside is not None:
            self._aside.shutdown(wait=False, cancel_futures=True)

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        sch = self.scheduler
        try:
            while True:
                joining = self._take()
                if joining is None:
                    return
                try:
                    sch.admit(joining)
                    before = sch.stats.tokens
                    events = sch.step(early=self._deliver)  # text and ends before the decoder's step
                    drawn = sch.stats.tokens - before
                except Exception as e:  # out of memory, a bug: fail this step's samples, keep serving
                    self.faults += 1
                    failed = [j for j in dict.fromkeys(sch.abort() + joining) if not j.done]
                    print(f"gpt2-server: error: a decoding step failed ({type(e).__name__}: {e}); "
                          f"{len(failed)} samples ended with an error", file=sys.stderr, flush=True)
                    self._deliver(self._fail(failed, e))
                    continue
                now = time.monotonic()
                self._recent.append((now, drawn))
                while self._recent and now - self._recent[0][0] > 60:
                    self._recent.popleft()
                if self.on_step is not None and drawn:
                    self.on_step(drawn)
                self._deliver(events)
        except BaseException as e:  # the thread itself is going down: fail every job instead of hanging
            self.failure = e
            with self._cv:
                self._stopping = True
                jobs = [j for j in sch.abort() + list(self._waiting) if not j.done]
                self._waiting.clear()
            self._deliver(self._fail(jobs, e))

    @staticmethod
    def _fail(jobs: List[Job], error: BaseException) -> List[Event]:
        for job in jobs:
            job.finish_reason = "error"
            job.done = True
        return [(job, "error", error) for job in jobs if not job.cancelled]

    def _deliver(self, events: List[Event]) -> None:
        if events:
            self.deliver(events)

    def _take(self) -> Optional[List[Job]]:
        """Jobs joining now (blocks while there is nothing to do); None: stop."""
        sch = self.scheduler
        with self._cv:
            while True:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()
                joining = []
                while self._waiting and len(joining) < sch.free:
                    job = self._waiting.popleft()
                    if not job.cancelled:
                        joining.append(job)
                if joining or sch.ready:
                    return joining
                if self._stopping:
                    return None
                self._cv.wait()


#: The nice value of the thread that prefills long prompts beside the decoding steps.
PREFILL_NICENESS = 10


def _lower_this_thread() -> None:
    """(Linux) this thread at nice ``PREFILL_NICENESS``: a long prompt's prefill takes what the steps of
    the others leave (measured on the small shape, 2 cores: beside 4 decoding rows a 512-token prefill took
    1.2 s instead of 0.29 s, and their steps 15.8 ms instead of 13.7; at nice 0, 0.64 s and 20.5 ms)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREFILL_NICENESS)
    except (OSError, AttributeError):
        pass


def vector_batches(lengths: Sequence[int], max_tokens: int = 4096, max_batch: int = 64,
                   overhead: int = 64) -> List[List[int]]:
    """Batches (lists of indices) for the vectors of texts of these token counts: the one
    least-padding planner of ``tasks.batching`` (gpt2-transform.py and gpt2-score.py plan the same
    way).  Over the golden texts, 100 at a time, the greedy fill padded 61.5 k tokens for 35.1 k
    real ones; this plan pads 38.9 k."""
    return plan(lengths, max_tokens, max_batch, overhead)


def deliver_each(events: Sequence[Tuple[Job, str, object]]) -> None:
    """The default ``Engine.deliver``: each event to its job's ``on_event``, in order."""
    for job, kind, data in events:
        job.on_event(job, kind, data)


