"""tasks/serving.py: the server's engine decodes every sample as gpt2-generate.py does."""
import threading
import time

import numpy as np
import pytest

from tasks.generate import GenerateOptions, Generator
from tasks.sampling import SamplingParams
from tasks.serving import Engine, QueueFull, SampleRequest, cut_at_stop


def _wait(jobs, timeout=120):
    end = time.monotonic() + timeout
    while not all(j.done for j in jobs):
        assert time.monotonic() < end, "engine did not finish"
        time.sleep(0.01)


@pytest.fixture
def engine(tiny, enc):
    e = Engine(tiny, enc, batch_size=4, max_queue=8).start()
    yield e
    e.stop()


def test_seeded_samples_equal_the_generator(tiny, enc, engine):
    contexts = ["今日は良い天気です。", "吾輩は猫である", ""]
    ref = list(Generator(tiny, enc).generate_many(contexts, num=3, batch_size=4,
                                                  options=GenerateOptions(top_k=40, seed=7, max_length=60)))
    pieces = {}
    lock = threading.Lock()

    def on_event(job, kind, data):
        if kind == "text":
            with lock:
                pieces[id(job)] = pieces.get(id(job), "") + data

    jobs = []
    for j, c in enumerate(contexts):
        for i in range(3):
            rng = np.random.default_rng(np.random.SeedSequence([7, j, i]))
            jobs.append(engine.submit(SampleRequest(engine.context_ids(c), SamplingParams(40, 0.0, 1.0), rng=rng,
                                                    max_length=60), on_event))
    _wait(jobs)
    assert [j.text for j in jobs] == [s.text for s in ref]
    assert [pieces.get(id(j), "") for j in jobs] == [j.text for j in jobs]


def test_max_tokens_stop_and_streamed_text(tiny, enc, engine):
    ids = engine.context_ids("今日は")
    greedy = SamplingParams(0, 0.0, 0.0)
    full = engine.submit(SampleRequest(ids, greedy, max_tokens=20), lambda *a: None)
    _wait([full])
    assert len(full.tokens) == 20 and full.finish_reason == "length"
    assert full.text == enc.decode(full.tokens)
    stop = full.text[5:7]
    streamed = []
    cut = engine.submit(SampleRequest(ids, greedy, max_tokens=20, stop=(stop,)),
                        lambda job, kind, data: streamed.append(data) if kind == "text" else None)
    _wait([cut])
    assert cut.text == cut_at_stop(full.text, [stop])[0] and cut.finish_reason == "stop"
    assert "".join(streamed) == cut.text


def test_cancel_frees_the_row_and_queue_is_bounded(tiny, enc):
    e = Engine(tiny, enc, batch_size=1, max_queue=1).start()
    try:
        ids = e.context_ids("今日は")
        long = e.submit(SampleRequest(ids, SamplingParams(0, 0.0, 0.0), max_tokens=100000), lambda *a: None)
        waiting = e.submit(SampleRequest(ids, SamplingParams(0, 0.0, 0.0), max_tokens=3), lambda *a: None)
        with pytest.raises(QueueFull):
            e.submit(SampleRequest(ids, SamplingParams(0, 0.0, 0.0), max_tokens=3), lambda *a: None)
        long.cancel()
        _wait([waiting])
        assert len(waiting.tokens) == 3
    finally:
        e.stop()
