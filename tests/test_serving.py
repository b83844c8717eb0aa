"""tasks/serving.py: the server's engine decodes every sample as gpt2-generate.py does."""
import os
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
        # 500 tokens during which <|endoftext|> cannot end it: still running when the others come
        long = e.submit(SampleRequest(ids, SamplingParams(0, 0.0, 0.0, min_length=500), max_tokens=100000),
                        lambda *a: None)
        end = time.monotonic() + 120
        while not (e.active_rows == 1 and long.tokens):  # the long sample holds the only row
            assert time.monotonic() < end, "the long sample never started"
            time.sleep(0.001)
        waiting = e.submit(SampleRequest(ids, SamplingParams(0, 0.0, 0.0), max_tokens=3), lambda *a: None)
        with pytest.raises(QueueFull):
            e.submit(SampleRequest(ids, SamplingParams(0, 0.0, 0.0), max_tokens=3), lambda *a: None)
        long.cancel()
        _wait([waiting])
        assert len(waiting.tokens) == 3
    finally:
        e.stop()


def test_generator_max_tokens_and_stop_match_the_engine(tiny, enc, engine):
    """gpt2-generate.py's --max_tokens / --stop (GenerateOptions) and the server's max_tokens / stop agree."""
    gen = Generator(tiny, enc)
    base = gen.generate("今日は", 4, GenerateOptions(seed=3, max_length=10 ** 6, max_tokens=25))
    stop = next(t[4:6] for t in base if len(t) > 8)
    for opts in (GenerateOptions(seed=3, max_length=10 ** 6, max_tokens=25),
                 GenerateOptions(seed=3, max_length=10 ** 6, max_tokens=25, stop=(stop, "ZZ")),
                 GenerateOptions(seed=3, max_length=12, stop=(stop,))):
        streamed = {}
        texts = gen.generate("今日は", 4, opts,
                             on_text=lambda i, piece: streamed.__setitem__(i, streamed.get(i, "") + piece))
        assert [streamed.get(i, "") for i in range(4)] == texts
        jobs = [engine.submit(SampleRequest(engine.context_ids("今日は"), opts.sampling(),
                                            rng=np.random.default_rng(np.random.SeedSequence([3, 0, i])),
                                            max_tokens=opts.max_tokens, max_length=opts.max_length,
                                            stop=opts.stop), lambda *a: None) for i in range(4)]
        _wait(jobs)
        assert [j.text for j in jobs] == texts
        for t in texts:
            assert not any(s in t for s in opts.stop)


def test_generator_options_refuse_bad_limits():
    from tasks.errors import OptionError

    with pytest.raises(OptionError, match="max_tokens"):
        GenerateOptions(max_tokens=-1)
    with pytest.raises(OptionError, match="stop"):
        GenerateOptions(stop=("",))
    with pytest.raises(OptionError, match="stop"):
        GenerateOptions(stop="。")


def test_quantized_engine_equals_the_quantized_generator(tiny, enc, tmp_path):
    """--quantize reaches the server's engine: its seeded samples are the quantized Generator's."""
    import shutil

    import model

    local = tmp_path / "tiny"
    shutil.copytree(tiny.path.rsplit("/", 1)[0], local)
    m = model.load(local)
    ref = Generator(m, enc, quantize="q8").generate("今日は", 2, GenerateOptions(top_k=40, seed=5, max_length=40))
    e = Engine(m, enc, batch_size=2, max_queue=4, quantize="q8").start()
    try:
        jobs = [e.submit(SampleRequest(e.context_ids("今日は"), SamplingParams(40, 0.0, 1.0), max_length=40,
                                       rng=np.random.default_rng(np.random.SeedSequence([5, 0, i]))),
                         lambda *a: None) for i in range(2)]
        _wait(jobs)
    finally:
        e.stop()
    assert e.decoder.engine == "onnx" and [j.text for j in jobs] == ref


def test_a_steps_events_are_delivered_at_once(tiny, enc):
    """Engine.deliver gets each step's events in one call (the server wakes its event loop once per step):
    at most one text per sample per call, and the pieces still add up to each sample's text."""
    e = Engine(tiny, enc, batch_size=4, max_queue=8)
    calls = []
    finished = threading.Event()

    def deliver(events):
        calls.append(list(events))
        if sum(kind == "done" for c in calls for _, kind, _ in c) == 3:
            finished.set()

    e.deliver = deliver
    e.start()
    try:
        jobs = e.submit_many([SampleRequest(e.context_ids("今日は"), SamplingParams(0, 0.0, 0.0), max_tokens=8 + i)
                              for i in range(3)], lambda *a: None)
        assert finished.wait(120), "engine did not finish"
    finally:
        e.stop()
    assert len(calls) <= e.steps
    for c in calls:
        texts = [id(job) for job, kind, _ in c if kind == "text"]
        assert len(texts) == len(set(texts))
    for job in jobs:
        assert "".join(d for c in calls for j, kind, d in c if j is job and kind == "text") == job.text
        assert [kind for c in calls for j, kind, _ in c if j is job][-1] == "done"
    assert any(len({id(j) for j, _, _ in c}) == 3 for c in calls)  # the samples' steps went out together


def test_samples_without_text_events_hear_only_of_their_end(tiny, enc):
    """A non-streaming answer submits its samples with text_events=False: the engine hands over no event
    per token for them (no wake-up of the event loop per step), only ``done``, and their finished texts
    are those of samples that had every text event, seed for seed."""
    def run(text_events):
        e = Engine(tiny, enc, batch_size=4, max_queue=8)
        calls = []
        e.deliver = lambda events: calls.append(list(events))
        e.start()
        try:
            jobs = e.submit_many([SampleRequest(e.context_ids("今日は"), SamplingParams(40, 0.0, 1.0),
                                                rng=np.random.default_rng(i), max_tokens=6 + 4 * i)
                                  for i in range(3)], lambda *a: None, text_events=text_events)
            _wait(jobs)
        finally:
            e.stop()
        return jobs, calls, e.steps

    quiet, calls, steps = run(False)
    loud, loud_calls, _ = run(True)
    assert [j.text for j in quiet] == [j.text for j in loud] and all(j.text for j in quiet)
    assert [j.finish_reason for j in quiet] == ["length"] * 3
    kinds = [kind for c in calls for _, kind, _ in c]
    assert kinds == ["done"] * 3
    assert len(calls) == 3 < steps  # one hand-over per sample that ended, none for the other steps
    assert sum(kind == "text" for c in loud_calls for _, kind, _ in c) >= 3 * 6


def test_embeddings_use_the_one_batch_planner(tiny, enc, corpus_lines):
    """The server's embeddings plan as gpt2-transform.py and gpt2-score.py do (tasks.batching,
    tested on its own in test_batching.py)."""
    from tasks import batching
    from tasks.serving import vector_batches
    from tasks.vectors import Vectorizer

    vec = Vectorizer(tiny, enc)
    lengths = [len(vec.ids(t)[0]) for t in corpus_lines[:300]]
    for part in (lengths[:1], lengths[:7], lengths[:100], lengths):
        batches = vector_batches(part, max_tokens=1024, max_batch=16)
        assert sorted(i for b in batches for i in b) == list(range(len(part)))
        assert batches == batching.plan(part, 1024, 16)
        vec.max_tokens, vec.max_batch = 1024, 16
        assert list(vec._plan(part)) == batches
    assert vector_batches([]) == []


def test_one_loop_for_both_front_ends_min_length_included(tiny, enc, engine):
    """The server's engine and gpt2-generate.py's Generator run the one scheduler: the same seed and
    options give the same text, min_length (the original's rewind) and stop strings included."""
    contexts = ["今日は良い天気です。", ""]
    opts = GenerateOptions(top_k=20, temperature=0.8, seed=11, max_length=50, min_length=6, stop=("。",))
    ref = list(Generator(tiny, enc).generate_many(contexts, num=2, batch_size=3, options=opts))
    jobs = []
    for j, c in enumerate(contexts):
        for i in range(2):
            rng = np.random.default_rng(np.random.SeedSequence([11, j, i]))
            jobs.append(engine.submit(SampleRequest(engine.context_ids(c), opts.sampling(), rng=rng, max_length=50,
                                                    stop=("。",)), lambda *a: None))
    _wait(jobs)
    assert [j.text for j in jobs] == [s.text for s in ref]
    assert all(len(j.tokens) >= 6 or j.finish_reason == "stop" for j in jobs)


def test_a_failed_step_fails_its_samples_and_the_engine_goes_on(tiny, enc, capfd):
    """A fault in one decoding step (here the decoder raises MemoryError once) ends the samples of that
    step with an error event, is logged as one line, and the next request is served."""
    e = Engine(tiny, enc, batch_size=2, max_queue=4).start()
    try:
        real_step = e.decoder.step
        calls = {"n": 0}

        def flaky(ids, tokens):
            calls["n"] += 1
            if calls["n"] == 3:
                raise MemoryError("injected")
            return real_step(ids, tokens)

        e.decoder.step = flaky
        events = []
        greedy = SamplingParams(0, 0.0, 0.0)
        first = e.submit(SampleRequest(e.context_ids("今日は"), greedy, max_tokens=10),
                         lambda job, kind, data: events.append(kind))
        _wait([first])
        assert first.finish_reason == "error" and events[-1] == "error"
        second = e.submit(SampleRequest(e.context_ids("今日は"), greedy, max_tokens=10), lambda *a: None)
        _wait([second])
        assert second.finish_reason == "length" and len(second.tokens) == 10
        assert e.failure is None and e.faults == 1
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and "a decoding step failed (MemoryError: injected)" in err
    finally:
        e.stop()


@pytest.mark.parametrize("engine_name", ["numpy", "onnx"])
def test_a_held_row_draws_nothing_and_goes_on_as_if_it_had_never_waited(tiny, enc, engine_name):
    from tasks.scheduler import Job, Scheduler

    gen = Generator(tiny, enc, engine=engine_name)
    params = SamplingParams(40, 0.0, 1.0)

    def run(held_steps):
        sch = Scheduler(gen.engine(2), enc, 2)
        a, b = (Job(SampleRequest(gen.context_ids(c), params, rng=np.random.default_rng(seed), max_tokens=24))
                for c, seed in (("今日は良い天気です。", 1), ("吾輩は猫である", 2)))
        sch.admit([a, b])
        steps = 0
        while sch.busy:
            a.held = steps in held_steps
            b.held = steps == 20  # both held: nothing to do
            assert sch.ready == (not (a.held and b.held))
            before = (len(a.tokens), len(b.tokens), sch.stats.tokens)
            events = sch.step()
            if a.held:
                assert len(a.tokens) == before[0] and all(job is not a for job, _, _ in events)
            if a.held and b.held:
                assert events == [] and (len(b.tokens), sch.stats.tokens) == before[1:]
            steps += 1
        return a, b, steps

    a0, b0, steps0 = run(())
    a1, b1, steps1 = run(range(3, 11))
    assert (a1.tokens, a1.text, b1.tokens, b1.text) == (a0.tokens, a0.text, b0.tokens, b0.text)
    assert len(a1.tokens) == len(b1.tokens) == 24 and (a1.drawn, b1.drawn) == (a0.drawn, b0.drawn)
    assert steps1 > steps0


@pytest.mark.parametrize("engine_name", ["numpy", "onnx"])
def test_a_row_held_for_long_is_parked_out_of_the_steps_and_keeps_its_place(tiny, enc, engine_name):
    from tasks.scheduler import PARK_AFTER, Job, Scheduler

    gen = Generator(tiny, enc, engine=engine_name)
    params = SamplingParams(40, 0.0, 1.0)
    sch = Scheduler(gen.engine(3), enc, 3)
    dec = sch.decoder
    jobs = [Job(SampleRequest(gen.context_ids(c), params, rng=np.random.default_rng(k), max_tokens=10 ** 6))
            for k, c in enumerate(("今日は良い天気です。", "吾輩は猫である", "春はあけぼの"))]
    a, b, c = jobs
    sch.admit(jobs)
    sch.step()
    a.held = c.held = True
    for k in range(PARK_AFTER):  # still computed beside b: a hold as short as this is not worth a copy
        sch.step()
        assert dec.rows == 3 and not sch.parked
    sch.step()
    assert dec.rows == 1 and dec.ids == [id(b)] and [row.job for row in sch.parked] == [a, c]
    assert sch.occupied == 3 and sch.free == 0  # their places are kept for them
    drawn = (len(a.tokens), len(c.tokens))
    sch.step()
    assert (len(a.tokens), len(c.tokens)) == drawn and dec.rows == 1
    c.cancel()  # a parked row's client goes: it ends with no trace in the decoder
    events = sch.step()
    assert c.finish_reason == "cancelled" and c.done and all(job is not c for job, _, _ in events)
    assert [row.job for row in sch.parked] == [a] and sch.free == 1
    a.held = False
    sch.step()
    assert set(dec.ids) == {id(a), id(b)} and not sch.parked and len(a.tokens) == drawn[0] + 1
    a.held = b.held = True  # every row held: nothing is computed, so nothing is parked
    assert not sch.ready
    for _ in range(PARK_AFTER + 2):
        assert sch.step() == [] and dec.rows == 2 and not sch.parked
    assert set(sch.abort()) == {a, b} and sch.occupied == 0 and dec.rows == 0


def _thread_cpu(thread) -> float:
    """CPU seconds a thread has used (Linux: /proc)."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_engine_sleeps_while_every_row_is_held_and_wakes_to_cancel_or_release(tiny, enc):
    e = Engine(tiny, enc, batch_size=2, max_queue=2).start()
    try:
        endless = SampleRequest(e.context_ids("今日は"), SamplingParams(0, 0.0, 1.0, min_length=500),
                                rng=np.random.default_rng(0), max_tokens=10 ** 6)
        job = e.submit(endless, lambda *a: None)
        end = time.monotonic() + 60
        while len(job.tokens) < 3:
            assert time.monotonic() < end, "the sample never started"
            time.sleep(0.01)
        before = e.steps
        e.hold(job)
        assert e.held_rows == 1
        time.sleep(0.3)  # the step under way when the row was held may still end (one at most)
        steps, drawn, cpu = e.steps, len(job.tokens), _thread_cpu(e._thread)
        assert steps <= before + 1
        time.sleep(0.3)  # a span in which nothing may happen: not a wait for something to happen
        assert (e.steps, len(job.tokens)) == (steps, drawn), "a held row drew tokens"
        assert _thread_cpu(e._thread) - cpu < 0.05, "the decoding thread spun while every row was held"
        e.release([job])
        end = time.monotonic() + 30
        while len(job.tokens) < drawn + 3:
            assert time.monotonic() < end, "a released row did not go on"
            time.sleep(0.01)
        e.hold(job)
        e.cancel([job])  # the loop sleeps with every row held: cancel wakes it, the row leaves
        _wait([job], timeout=30)
        assert job.finish_reason == "cancelled" and e.active_rows == 0
    finally:
        e.stop()


class _ByHand:
    """An executor whose work runs only when the test says (``run``): a prefill aside under way for as
    long as the test likes."""

    def __init__(self):
        self.pending = []

    def submit(self, fn, *args):
        import concurrent.futures
        future = concurrent.futures.Future()
        self.pending.append((future, fn, args))
        return future

    def run(self):
        for future, fn, args in self.pending:
            try:
                future.set_result(fn(*args))
            except Exception as e:  # noqa: BLE001 - handed over as the executor would
                future.set_exception(e)
        self.pending = []


def _long_context(gen):
    return gen.context_ids("吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。" * 6)


def test_a_long_prompt_is_prefilled_aside_while_the_others_go_on(tiny, enc, monkeypatch):
    import tasks.scheduler as scheduler
    from tasks.scheduler import Job, Scheduler

    monkeypatch.setattr(scheduler, "ASIDE_AFTER_STEPS", 0)  # any prompt, once the scheduler has measured
    gen = Generator(tiny, enc, engine="onnx")
    params = SamplingParams(40, 0.0, 1.0)
    long_ids = _long_context(gen)
    assert len(long_ids) > 100

    def jobs():
        return [Job(SampleRequest(gen.context_ids("今日は良い天気です。"), params, rng=np.random.default_rng(1),
                                  max_tokens=30))] + \
               [Job(SampleRequest(long_ids, params, rng=np.random.default_rng(2 + i), max_tokens=12)) for i in range(3)]

    # the reference: every sample prefilled in the table
    sch = Scheduler(gen.engine(4), enc, 4)
    a0, *longs0 = jobs()
    sch.admit([a0])
    sch.step()
    sch.admit(longs0)
    while sch.busy:
        sch.step()

    by_hand, woken = _ByHand(), []
    sch = Scheduler(gen.engine(4), enc, 4, aside=by_hand)
    sch.on_prefilled = lambda: woken.append(1)
    a, *longs = jobs()
    sch.admit([a])
    sch.step()
    assert sch.stats.prefills_aside == 0  # (a first sample, with no one else decoding, in the table)
    sch.admit(longs)
    # one prefill for the three samples of one context, under way: the first sample goes on alone
    assert len(by_hand.pending) == 1 and sch.decoder.rows == 1 and sch.occupied == 4 and sch.free == 0
    drawn = len(a.tokens)
    for _ in range(3):
        sch.step()
    assert len(a.tokens) == drawn + 3 and all(not j.tokens for j in longs) and sch.ready
    longs[2].cancel()
    by_hand.run()
    assert woken == [1]
    events = sch.step()  # the prefill is done: two join (and draw), the cancelled one ends without a row
    assert sch.stats.prefills_aside == 1 and sch.decoder.rows == 3
    assert longs[2].finish_reason == "cancelled" and all(job is not longs[2] for job, _, _ in events)
    assert all(len(j.tokens) == 1 for j in longs[:2])
    while sch.busy:
        sch.step()
    # the same texts as in the table: the aside prefill gives the very numbers, and a sample's tokens
    # depend only on its own generator
    assert [a.tokens] + [j.tokens for j in longs[:2]] == [a0.tokens] + [j.tokens for j in longs0[:2]]
    assert a.text == a0.text and [j.text for j in longs[:2]] == [j.text for j in longs0[:2]]


def test_which_prompts_are_prefilled_aside(tiny, enc):
    from tasks.scheduler import ASIDE_AFTER_STEPS, Job, Scheduler

    gen = Generator(tiny, enc, engine="onnx")
    sch = Scheduler(gen.engine(4), enc, 4, aside=_ByHand())
    job = lambda n: Job(SampleRequest([5] * n, SamplingParams(), max_tokens=100))  # noqa: E731
    assert sch._to_prefill_aside([job(500)]) == {}  # nobody else decodes
    sch.admit([job(3)])
    assert sch._to_prefill_aside([job(500)]) == {}  # no step measured yet
    sch.step()
    sch._inline = [1000, 1.0]                 # 1 ms a token in the table ...
    sch.stats.steps, sch.stats.decode_seconds = 10, 0.01   # ... 1 ms a step
    short, long = job(ASIDE_AFTER_STEPS), job(ASIDE_AFTER_STEPS + 1)
    assert list(sch._to_prefill_aside([short, long]).values()) == [long]
    assert Scheduler(Generator(tiny, enc, engine="numpy").engine(4), enc, 4, aside=_ByHand()).aside is None


def test_an_engine_prefills_long_prompts_aside_and_gives_the_cli_s_text(tiny, enc):
    """The server's engine, with its real prefill thread: a long context joining while another sample
    decodes is prefilled aside (once the engine has measured steps) and gives gpt2-generate.py's text."""
    e = Engine(tiny, enc, batch_size=4, max_queue=8, engine="onnx").start()
    try:
        params = SamplingParams(40, 0.0, 1.0)
        endless = e.submit(SampleRequest(e.context_ids("今日は"), params, rng=np.random.default_rng(0),
                                         max_tokens=10 ** 6), lambda *a: None)
        end = time.monotonic() + 60
        while e.steps < 50:
            assert time.monotonic() < end, "the first sample never ran"
            time.sleep(0.01)
        gen = Generator(tiny, enc, engine="onnx")
        long_ids = _long_context(gen)
        seeds = [np.random.SeedSequence([7, 0, i]) for i in range(2)]
        jobs = e.submit_many([SampleRequest(long_ids, params, rng=np.random.default_rng(s), max_tokens=20)
                              for s in seeds], lambda *a: None)
        _wait(jobs)
        assert e.scheduler.stats.prefills_aside == 1
        e.cancel([endless])
        from tasks.scheduler import Job, Scheduler
        ref = [Job(SampleRequest(long_ids, params, rng=np.random.default_rng(s), max_tokens=20)) for s in seeds]
        sch = Scheduler(gen.engine(2), enc, 2)
        sch.admit(ref)
        while sch.busy:
            sch.step()
        assert [j.tokens for j in jobs] == [j.tokens for j in ref] and all(len(j.tokens) == 20 for j in jobs)
    finally:
        e.stop()


def test_a_step_hands_its_events_over_before_the_decoder_takes_the_tokens(tiny, enc):
    """A sample that ends (and a stream's new text) reaches its reader before the decoder's step of the
    rows that go on -- most of a step's time -- not after it."""
    from tasks.scheduler import Job, Scheduler

    gen = Generator(tiny, enc, engine="onnx")
    sch = Scheduler(gen.engine(3), enc, 3)
    order = []
    real = sch.decoder.step
    sch.decoder.step = lambda ids, tokens: (order.append("decoder"), real(ids, tokens))[1]
    params = SamplingParams(40, 0.0, 1.0)
    one, two, five = (Job(SampleRequest(gen.context_ids("今日は"), params, rng=np.random.default_rng(n),
                                        max_tokens=n)) for n in (1, 2, 5))
    sch.admit([one, two, five])
    returned = sch.step(early=lambda events: order.append([(job, kind) for job, kind, _ in events]))
    assert order == [[(one, "done")], "decoder"] and returned == []
    order.clear()
    returned = sch.step()  # without ``early``: the events come back once the decoder has taken the tokens
    assert order == ["decoder"] and returned == [(two, "done", None)]
