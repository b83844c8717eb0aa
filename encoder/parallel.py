"""Encoding long texts in a process of their own, so that they do not hold this process's GIL.

    from encoder.parallel import EncoderPool
    pool = EncoderPool(enc)                     # nothing started yet
    ids = pool.encode_many(texts, cancelled)    # [[id, ...], ...], or None when cancelled
    ids = pool.encode_many(texts, cancelled, arrays=True)   # [int32 array, ...]
    pool.close()

The BPE encoder is pure Python: encoding a large request (hundreds of kilobytes of text) holds the
interpreter lock for a good part of a second, and every other thread of the process -- a server's
decoding loop, its event loop delivering tokens -- waits for it at each step.  ``EncoderPool``
encodes small inputs in the calling thread (no round trip) and larger ones (``threshold`` characters
in all) in one worker process started on first need (``spawn``: nothing of this process's threads is
inherited), in chunks of about ``chunk`` characters, so that a request that ends early stops after
the chunk in progress.  The worker runs at a lower CPU priority (``niceness``, default +10): on a
machine whose cores are all decoding, it takes what decoding leaves.  The numbers are the encoder's
own (the worker holds a copy of it).  A worker that dies is replaced on the next call; meanwhile
that call encodes in the calling thread.

``arrays=True`` gives each text's ids as an int32 array: the worker's answer then crosses over as
buffers, which this process takes in a fraction of a millisecond, where lists of ints are rebuilt one
Python int at a time (1.3-1.5 ms per 50,000 tokens, holding the interpreter lock: measured to cost
a server's other clients more than the encoding itself).  A caller that needs only part of the ids
(the last n_ctx of a prompt) converts only that part.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
from typing import List, Optional, Sequence

import numpy as np

_WORKER_ENCODER = None


def _start_worker(enc, niceness: int) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = enc
    if niceness:
        try:
            os.nice(niceness)
        except OSError:
            pass


def _encode_chunk(texts: Sequence[str], arrays: bool = False) -> list:
    if arrays:
        return [np.asarray(_WORKER_ENCODER.encode(t), np.int32) for t in texts]
    return [_WORKER_ENCODER.encode(t) for t in texts]


def _chunks(texts: Sequence[str], chunk: int) -> List[List[int]]:
    """Indices of ``texts`` grouped in order, about ``chunk`` characters a group (a longer text alone)."""
    groups, current, size = [], [], 0
    for i, t in enumerate(texts):
        if current and size + len(t) > chunk:
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += len(t)
    if current:
        groups.append(current)
    return groups


class EncoderPool:
    """``encode_many(texts, cancelled)``: ``enc.encode`` of each text, off this process's GIL when the
    texts are long (see the module's docstring).  Thread-safe."""

    def __init__(self, enc, threshold: int = 20_000, chunk: int = 50_000, niceness: int = 10):
        self.enc, self.threshold, self.chunk, self.niceness = enc, threshold, chunk, niceness
        self._pool: Optional[concurrent.futures.ProcessPoolExecutor] = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> Optional[concurrent.futures.ProcessPoolExecutor]:
        with self._lock:
            if self._closed:
                return None
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker, initargs=(self.enc, self.niceness))
            return self._pool

    def _discard(self, pool) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def _here(self, texts: Sequence[str], cancelled, arrays: bool) -> Optional[list]:
        out = []
        for t in texts:
            if cancelled is not None and cancelled.is_set():
                return None
            ids = self.enc.encode(t)
            out.append(np.asarray(ids, np.int32) if arrays else ids)
        return out

    def encode_many(self, texts: Sequence[str], cancelled: Optional[threading.Event] = None,
                    arrays: bool = False) -> Optional[list]:
        """The token ids of every text (ValueError as ``enc.encode`` raises it), or None as soon as
        ``cancelled`` is set: lists of ints, or with ``arrays`` int32 arrays (see the module)."""
        if sum(len(t) for t in texts) < self.threshold:
            return self._here(texts, cancelled, arrays)
        pool = self._executor()
        if pool is None:
            return self._here(texts, cancelled, arrays)
        groups = _chunks(texts, self.chunk)
        try:
            futures = [pool.submit(_encode_chunk, [texts[i] for i in g], arrays) for g in groups]
        except RuntimeError:  # shut down meanwhile, or broken
            self._discard(pool)
            return self._here(texts, cancelled, arrays)
        out: list = [None] * len(texts)
        try:
            for g, f in zip(groups, futures):
                while True:
                    if cancelled is not None and cancelled.is_set():
                        return None
                    done, _ = concurrent.futures.wait([f], timeout=0.05)  # the cancellation is checked
                    if done:
                        break
                for i, ids in zip(g, f.result()):
                    out[i] = ids
        except concurrent.futures.process.BrokenProcessPool:
            self._discard(pool)
            return self._here(texts, cancelled, arrays)
        finally:
            for f in futures:
                f.cancel()  # those not started yet (a request that ended early)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the worker (chunks not started are dropped; the one in progress, at most ``chunk``
        characters, is waited for); later calls encode in the calling thread.  Waiting matters: an executor
        left to stop on its own races the interpreter's exit, which may wake its closing pipe and print an
        OSError traceback on the way out."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["EncoderPool"]
