"""encoder.parallel.EncoderPool: long texts encoded in a process of their own give the encoder's own ids,
and a request that ends early stops there."""
import threading

import numpy as np
import pytest

from encoder.parallel import EncoderPool, _chunks


@pytest.fixture
def pool(enc):
    p = EncoderPool(enc, threshold=2_000, chunk=3_000)
    yield p
    p.close()


def test_long_texts_are_encoded_elsewhere_with_the_same_ids(pool, enc, corpus_lines):
    texts = corpus_lines[:400]
    assert sum(map(len, texts)) > pool.threshold
    assert pool.encode_many(texts) == [enc.encode(t) for t in texts]
    assert pool._pool is not None  # a worker process did it
    short = texts[:2]
    assert sum(map(len, short)) < pool.threshold
    assert pool.encode_many(short) == [enc.encode(t) for t in short]
    assert pool.encode_many([]) == []


def test_arrays_hold_the_same_ids_on_either_path(pool, enc, corpus_lines):
    for texts in (corpus_lines[:400], corpus_lines[:2]):  # in the worker, and in the calling thread
        got = pool.encode_many(texts, arrays=True)
        assert all(isinstance(a, np.ndarray) and a.dtype == np.int32 for a in got)
        assert [a.tolist() for a in got] == [enc.encode(t) for t in texts]


def test_a_cancelled_request_gets_none(pool, corpus_lines):
    cancelled = threading.Event()
    cancelled.set()
    assert pool.encode_many(corpus_lines[:400], cancelled) is None
    assert pool.encode_many(corpus_lines[:2], cancelled) is None


def test_a_closed_pool_encodes_in_the_calling_thread(enc, corpus_lines):
    p = EncoderPool(enc, threshold=10)
    p.close()
    texts = corpus_lines[:50]
    assert p.encode_many(texts) == [enc.encode(t) for t in texts]
    assert p._pool is None


def test_a_dead_worker_is_replaced(pool, enc, corpus_lines):
    texts = corpus_lines[:400]
    pool.encode_many(texts)
    for proc in list(pool._pool._processes.values()):
        proc.kill()
        proc.join()
    assert pool.encode_many(texts) == [enc.encode(t) for t in texts]  # this call: in the calling thread
    assert pool.encode_many(texts) == [enc.encode(t) for t in texts]  # the next: a new worker


def test_chunks_keep_the_order():
    assert _chunks(["aa", "bbb", "c", "dddd"], 4) == [[0], [1, 2], [3]]
    assert _chunks(["x" * 10], 4) == [[0]]
    assert _chunks([], 4) == []


def test_close_waits_for_the_worker_to_end(enc, corpus_lines):
    """Nothing of the pool outlives close(): an executor left to stop on its own raced the interpreter's
    exit (an OSError traceback from concurrent.futures on a server's way out, now and then)."""
    p = EncoderPool(enc, threshold=2_000, chunk=3_000)
    p.encode_many(corpus_lines[:400])
    executor = p._pool
    processes = list(executor._processes.values())
    p.close()
    assert not any(proc.is_alive() for proc in processes)
    manager = executor._executor_manager_thread
    assert manager is None or not manager.is_alive()
