"""tasks.batching: the one least-padding planner of vectors, scores and the server's embeddings."""
import itertools

import numpy as np
import pytest

from tasks import batching


def _partitions(items):
    """Every way to split ``items`` into non-empty groups (set partitions)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first]] + part
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]


def _allowed(lengths, batch, max_tokens, max_batch):
    return len(batch) <= max_batch and (len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= max_tokens)


def _check_plan(lengths, batches, max_tokens, max_batch):
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert b, batches
        assert _allowed(lengths, b, max_tokens, max_batch), (b, [lengths[i] for i in b])


@pytest.mark.parametrize("seed", range(16))
def test_plan_is_the_cheapest_of_all_partitions(seed):
    """Brute force over every set partition (not only runs of the sorted rows) of small cases."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    lengths = [int(x) for x in rng.integers(1, 40, n)]
    max_tokens = int(rng.choice([1, 20, 40, 60, 120, 1000]))
    max_batch = int(rng.integers(1, 10))  # (more rows than there are, too)
    overhead = int(rng.choice([0, 1, 16, 64]))
    batches = batching.plan(lengths, max_tokens, max_batch, overhead)
    _check_plan(lengths, batches, max_tokens, max_batch)
    best = min(batching.cost(lengths, p, overhead) for p in _partitions(list(range(n)))
               if all(_allowed(lengths, b, max_tokens, max_batch) for b in p))
    assert batching.cost(lengths, batches, overhead) == best, (lengths, max_tokens, max_batch, overhead, batches)


def test_cost_counts_padding_and_batches():
    lengths = [3, 5, 2]
    assert batching.padded_tokens(lengths, [[2, 0], [1]]) == 2 * 3 + 5
    assert batching.cost(lengths, [[2, 0], [1]], overhead=10) == 2 * 3 + 5 + 20


def test_limits_are_respected_on_a_large_plan():
    rng = np.random.default_rng(3)
    lengths = [int(w) for w in rng.integers(1, 70, 500)] + [1024, 1024, 900, 5000]
    for max_tokens, max_batch in ((4096, 64), (2048, 128), (64, 4), (1, 1), (100000, 3)):
        batches = batching.plan(lengths, max_tokens, max_batch)
        _check_plan(lengths, batches, max_tokens, max_batch)
    assert [len(b) for b in batching.plan(lengths, 1, 64)] == [1] * len(lengths)  # nothing fits: one row each


def test_plan_pads_less_than_a_greedy_fill():
    """The greedy fill gpt2-transform.py used (sorted, batches filled up to max_tokens) is never cheaper."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        lengths = [int(w) for w in rng.integers(1, 200, int(rng.integers(1, 300)))]
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        greedy, batch = [], []
        for i in order:
            if batch and ((len(batch) + 1) * lengths[i] > 1024 or len(batch) >= 16):
                greedy.append(batch)
                batch = []
            batch.append(i)
        greedy.append(batch)
        assert batching.cost(lengths, batching.plan(lengths, 1024, 16)) <= batching.cost(lengths, greedy)


def test_batches_run_shortest_first_and_sorted():
    lengths = [9, 1, 5, 5, 3, 7]
    batches = batching.plan(lengths, 10, 2)
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert batching.plan([], 10, 2) == []


def test_ties_keep_the_larger_last_batch():
    """Equal lengths and no per-batch cost: every split costs the same; the plan is deterministic."""
    assert batching.plan([4, 4, 4], 100, 3, overhead=0) == [[0, 1, 2]]


def test_in_order_restores_the_input_order():
    rng = np.random.default_rng(7)
    lengths = [int(w) for w in rng.integers(0, 30, 57)]
    seen = []

    def run(rows):
        seen.append(list(rows))
        return [("row", i, lengths[i]) for i in rows]

    out = batching.in_order(run, lengths, max_tokens=60, max_batch=5)
    assert out == [("row", i, w) for i, w in enumerate(lengths)]
    assert seen == batching.plan(lengths, 60, 5)
    with pytest.raises(ValueError, match="gave 0 results"):
        batching.in_order(lambda rows: [], [1, 2])


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0, max_batch=1), dict(max_tokens=1, max_batch=0),
                                    dict(max_tokens=1.5, max_batch=1), dict(max_tokens=1, max_batch=1, overhead=-1)])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be an integer of at least"):
        batching.plan([1, 2], **kwargs)


def test_vectors_and_scores_use_the_planner(monkeypatch):
    """gpt2-transform.py's and gpt2-score.py's batches are this plan (no second planner)."""
    from tasks import score, vectors

    lengths = [12, 3, 40, 7, 7, 90, 1]
    assert score._plan(lengths, 64, 3) == batching.plan(lengths, 64, 3)
    vec = vectors.Vectorizer.__new__(vectors.Vectorizer)
    vec.max_tokens, vec.max_batch = 64, 3
    assert list(vec._plan(lengths)) == batching.plan(lengths, 64, 3)
    calls = []
    monkeypatch.setattr(batching, "plan", lambda *a, **k: calls.append(a) or [])
    list(vec._plan(lengths))
    score._plan(lengths, 64, 3)
    assert len(calls) == 2


def test_permutations_give_the_same_cost():
    lengths = [5, 1, 8, 8, 2, 13]
    costs = {batching.cost(p, batching.plan(list(p), 30, 3)) for p in itertools.permutations(lengths)}
    assert len(costs) == 1
