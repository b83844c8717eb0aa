"""The server's explicit state, and each request's channel of events.

``State`` is everything a route reads: the model, the encoder, the engine, the configuration, the
metrics, the lock of batched forward passes, and the shutdown deadline.  ``Channel`` is one request's
queue on the event loop: the engine's events of its samples, a worker's result, and the ends that
interrupt a request (its --timeout, the client hanging up, the server shutting down) all arrive there,
so every route waits on one ``await channel.get()`` and nothing polls.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from tasks.serving import deliver_each

from .requests import ApiError

log = logging.getLogger("gpt2ja.server")

#: What ends a request early (the kind of a channel's event with no job).
TIMEOUT, SHUTDOWN, DISCONNECT, RESULT = "timeout", "shutdown", "disconnect", "result"


class ClientGone(Exception):
    """The client hung up: nothing is answered (its samples are cancelled)."""


@dataclass
class State:
    model: Any
    enc: Any
    engine: Any
    config: Any
    metrics: Any
    #: batched forward passes (scores, embeddings), one at a time at a lower priority (ForwardWorker)
    forward: "ForwardWorker"
    created: int = field(default_factory=lambda: int(time.time()))
    #: monotonic time by which every request must have answered (set when shutting down)
    stop_by: Optional[float] = None
    channels: "weakref.WeakSet[Channel]" = field(default_factory=weakref.WeakSet)
    #: encodes long texts in a process of its own (encoder.parallel); made by create_app
    encoder_pool: Any = None
    _scorer: Any = None
    _last_fault: Optional[BaseException] = None  # logged once, not once per request it failed

    @property
    def hparams(self):
        return self.model.hparams

    def warm_up(self) -> None:
        """Build the batched forward passes (vectors, scores, the logits of prompt_top) once, on the forward
        worker, before the server takes requests: building them holds the interpreter lock for a good part
        of a second, which the first embeddings or scoring request would otherwise make every stream wait
        for."""
        if not hasattr(self.model, "build_forward_passes"):
            return
        eos = self.enc.eos_id

        def work(cancelled):
            self.model.build_forward_passes()
            list(self.scorer.score_token_lists([[eos]]))

        self.forward.run(work, time.monotonic() + 3600, threading.Event())

    @property
    def scorer(self):
        if self._scorer is None:
            from tasks.score import Scorer

            self._scorer = Scorer(self.model, self.enc, exclude_end=True)
        return self._scorer

    def capacity(self) -> int:
        """Samples the engine can ever hold at once: rows in the batch plus places in its queue."""
        return self.engine.batch_size + self.engine.max_queue

    def room(self) -> int:
        """Samples that could be queued now (the engine checks again, atomically, at submission)."""
        return self.capacity() - self.engine.active_rows - self.engine.queue_length

    def begin_shutdown(self, grace: float) -> None:
        """SIGTERM or Ctrl-C (on the event loop): every request still running at ``grace`` less a margin
        ends with an error object (a stream: an error event and [DONE]) before the server stops waiting."""
        margin = min(1.0, grace / 3)
        self.stop_by = time.monotonic() + grace - margin
        for ch in list(self.channels):
            ch.arm()

    def fault(self, exc: BaseException) -> ApiError:
        """An engine's failed step: one log line per fault, a 500 for each of its requests."""
        if exc is not self._last_fault:
            self._last_fault = exc
            log.error("generation failed: %s: %s", type(exc).__name__, exc)
        return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error",
                        code="generation_failed")


#: A sample whose text events wait unread this many deep in its request's queue is held (its row draws
#: nothing) until the request reads them: the reader -- a stream's client -- is behind.
HOLD_AFTER = 16


class Channel:
    """One request's events on the event loop, with its deadline (--timeout), the shutdown deadline and
    the client's disconnection as events of their own.  ``close()`` when the request ends.

    Backpressure: a sample whose text piles up unread (``HOLD_AFTER`` events: a streaming client that
    stopped reading, so the response's writes wait) is held by the engine -- its row draws nothing: no
    sampling, text or events, and no step at all while every row is held -- until the request next reads
    its events."""

    def __init__(self, state: State, deadline: float, receive: Optional[Callable] = None):
        self.state = state
        self.deadline = deadline
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._watch: Optional[asyncio.Task] = None
        self.closed = False
        self._unread: dict = {}   # id(job) -> text events queued since the last read
        self._held: list = []
        state.channels.add(self)
        self.arm()
        if receive is not None:
            self._watch = self.loop.create_task(self._watch_disconnect(receive))
        engine = state.engine
        if getattr(engine.deliver, "loop", None) is not self.loop:
            engine.deliver = LoopDelivery(self.loop)

    @property
    def until(self) -> float:
        """When this request must end: its own deadline, or the shutdown's when that is sooner."""
        stop_by = self.state.stop_by
        return self.deadline if stop_by is None else min(self.deadline, stop_by)

    def arm(self) -> None:
        if self.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        shutdown = self.state.stop_by is not None and self.state.stop_by < self.deadline
        kind = SHUTDOWN if shutdown else TIMEOUT
        delay = max(0.0, self.until - time.monotonic())
        self._timer = self.loop.call_later(delay, self.queue.put_nowait, (None, kind, None))

    async def _watch_disconnect(self, receive) -> None:
        """The body has been read: the next ASGI message is http.disconnect (when the client hangs up)."""
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.queue.put_nowait((None, DISCONNECT, None))
                    return
        except Exception:  # noqa: BLE001 - a server that cannot tell us: no disconnect event
            return

    def on_event(self, job, kind: str, data) -> None:
        """The engine's ``on_event`` (called on the event loop, see ``LoopDelivery``)."""
        self.queue.put_nowait((job, kind, data))
        if kind == "text":
            unread = self._unread[id(job)] = self._unread.get(id(job), 0) + 1
            if unread == HOLD_AFTER:
                self.state.engine.hold(job)
                self._held.append(job)

    def put_threadsafe(self, kind: str, data) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (None, kind, data))
        except RuntimeError:  # the loop is closed
            pass

    async def get(self) -> List[Tuple[Any, str, Any]]:
        """The next events: at least one, and every one already waiting (one step's events at once)."""
        events = [await self.queue.get()]
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        self._unread.clear()
        if self._held:
            self.state.engine.release(self._held)
            self._held = []
        return events

    def ended(self, kind: str) -> ApiError:
        """The error of an early end (TIMEOUT or SHUTDOWN); raises ClientGone for DISCONNECT."""
        if kind == DISCONNECT:
            raise ClientGone()
        if kind == SHUTDOWN:
            return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        return ApiError(504, f"the request took longer than {self.state.config.timeout:g} s", type="timeout",
                        code="timeout")

    async def in_worker(self, work: Callable[[threading.Event], Any]):
        """``work(cancelled)`` on a worker thread; its result, or the early end of this request (then
        ``cancelled`` is set: the work stops at its next check)."""
        cancelled = threading.Event()

        def run():
            try:
                self.put_threadsafe(RESULT, (True, work(cancelled)))
            except BaseException as e:  # noqa: BLE001 - handed to the request
                self.put_threadsafe(RESULT, (False, e))

        self.loop.run_in_executor(None, run)
        try:
            while True:
                for _, kind, data in await self.get():
                    if kind == RESULT:
                        ok, value = data
                        if ok:
                            return value
                        raise value
                    if kind in (TIMEOUT, SHUTDOWN, DISCONNECT):
                        raise self.ended(kind)
        finally:
            cancelled.set()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._watch is not None:
            self._watch.cancel()
        self.state.channels.discard(self)


class LoopDelivery:
    """``Engine.deliver`` for an asyncio server: a step's events go to their requests' queues with one
    ``call_soon_threadsafe`` (one wake-up of the event loop per step)."""

    def __init__(self, loop):
        self.loop = loop

    def __call__(self, events) -> None:
        try:
            self.loop.call_soon_threadsafe(deliver_each, events)
        except RuntimeError:  # the loop is closed: the server is gone
            pass


#: The nice value of batched forward passes (their thread and TensorFlow's) while decoding runs elsewhere.
FORWARD_NICENESS = 10
#: How often a thread waiting for a forward job looks whether its request has ended (seconds).
WAIT_SLICE = 0.05


class _Job:
    __slots__ = ("work", "until", "cancelled", "done", "started", "abandoned", "result", "error", "lock")

    def __init__(self, work, until, cancelled):
        self.work, self.until, self.cancelled = work, until, cancelled
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.started = self.abandoned = False
        self.result = self.error = None


class ForwardWorker:
    """Batched forward passes (prompt scoring, embeddings) one at a time, on a thread of their own.

    ``run(work, until, cancelled)`` (from a request's worker thread) queues ``work(cancelled)`` and returns
    its result; a job that has not started by ``until`` (monotonic), or whose request was cancelled
    meanwhile, never starts (504): a request never waits on another longer than its own deadline.

    With ``lower()`` true (decoding does not run on TensorFlow: ONNX Runtime or numpy on a CPU), the
    worker thread and TensorFlow's compute threads (``tf_*``: its inter-op ``tf_Compute`` and the intra-op
    pool that ``model.load`` names ``tf_intra``) run at nice +10 (Linux): batched forward passes use what
    decoding leaves, so that a large embeddings or scoring request -- or a client that sends one and hangs
    up -- does not slow the tokens of every stream (bench/bench_server_hostile.py).  TensorFlow runs a
    part of each op on the thread that calls it, so that thread must be a low-priority one too: a
    thread's nice value cannot be lowered again without privileges, hence one thread kept for this."""

    def __init__(self, lower: Callable[[], bool] = lambda: False):
        self._lower = lower
        self._jobs: "queue.SimpleQueue[Optional[_Job]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._start = threading.Lock()

    def _ensure(self) -> None:
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="forward", daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        import os

        from util.system import lower_thread_priority

        lowered = False
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if not lowered and self._lower():
                try:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FORWARD_NICENESS)
                except (OSError, AttributeError):
                    pass
                lowered = True
            if lowered:
                lower_thread_priority("tf_", FORWARD_NICENESS)  # (pools TensorFlow started since)
            with job.lock:
                if job.abandoned or job.cancelled.is_set() or time.monotonic() > job.until:
                    job.abandoned = True
                else:
                    job.started = True
            if job.started:
                try:
                    job.result = job.work(job.cancelled)
                except BaseException as e:  # noqa: BLE001 - handed to the request
                    job.error = e
            job.done.set()

    def run(self, work: Callable[[threading.Event], Any], until: float, cancelled: threading.Event) -> Any:
        """``work(cancelled)``'s result.  The calling thread (a request's worker thread) is let go as soon as
        the request ends (``cancelled``: the client hung up, the deadline passed), not when the job's
        forward pass in progress does -- seconds on larger models: a request that ended holds no thread
        of the server's pool while its job stops at its next check (then the result is None)."""
        job = _Job(work, until, cancelled)
        self._ensure()
        self._jobs.put(job)
        while not job.done.wait(timeout=min(WAIT_SLICE, until - time.monotonic()) if time.monotonic() < until
                                else WAIT_SLICE):
            late = time.monotonic() >= until
            if not (late or cancelled.is_set()):
                continue
            with job.lock:
                if not job.started:
                    job.abandoned = True  # the worker skips it
            if job.abandoned:
                why = "waited for other embeddings or scores past its deadline" if late else "was cancelled"
                raise ApiError(504, f"the request {why}", type="timeout", code="timeout")
            if cancelled.is_set():
                return None  # started: it stops at its next check of ``cancelled``; nobody reads it
            # past the deadline and started: the request's end (which sets ``cancelled``) comes next
        if job.abandoned:
            raise ApiError(504, "the request was cancelled", type="timeout", code="timeout")
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        """The worker ends after the job in progress (the queued ones never start)."""
        self._jobs.put(None)
