"""The one batch planner for forward passes over rows of different lengths (vectors, scores,
the server's embeddings): which rows go together so that as little as possible is padding.

    from tasks.batching import plan, in_order
    batches = plan([12, 3, 40, 7], max_tokens=4096, max_batch=64)   # [[1, 3, 0, 2]]: lists of indices
    results = in_order(lambda rows: f(rows), [12, 3, 40, 7])       # f over each batch, input order back

A batch of rows is right-padded to its longest row, so it costs its padded tokens (rows x the
longest row) plus a little per call (``overhead``, counted in tokens: the call itself and the lower
efficiency of small batches).  Every batch holds at most ``max_batch`` rows and, unless it is a
single row, at most ``max_tokens`` padded tokens (a row longer than that goes alone).

The plan is the cheapest under that cost.  Some cheapest plan always takes the rows sorted by length
in consecutive runs (given any plan, hand the sorted rows out in runs of its batches' sizes, the
batches in order of their longest row: no batch's longest row gets longer, so no budget is broken
and nothing costs more), so the cheapest split of the sorted lengths into runs, found by dynamic
programming, is the cheapest plan of all.  Among equally cheap plans it takes the one whose last
batches are the largest.  Right padding never changes a row's numbers beyond float rounding
(attention is causal and padding is never attended to), so callers get the same results from
any plan up to that rounding; ``in_order`` hands them back in input order.
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence, TypeVar

#: What one more forward pass costs, in padded tokens.
OVERHEAD = 64

T = TypeVar("T")


def _check(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def plan(lengths: Sequence[int], max_tokens: int, max_batch: int, overhead: int = OVERHEAD) -> List[List[int]]:
    """Batches (lists of indices into ``lengths``), together covering every index once, each
    sorted by length and the batches from the shortest rows to the longest, with the least
    padded tokens plus ``overhead`` per batch; each batch at most ``max_batch`` rows and, when it
    holds more than one row, at most ``max_tokens`` padded tokens."""
    _check("max_tokens", max_tokens, 1)
    _check("max_batch", max_batch, 1)
    _check("overhead", overhead, 0)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    width = [int(lengths[i]) for i in order]
    n = len(order)
    best = [0] + [math.inf] * n  # best[j]: the cost of the cheapest plan of the j shortest rows
    cut = [0] * (n + 1)  # ... whose last batch is rows cut[j] .. j-1
    for j in range(1, n + 1):
        w = width[j - 1]  # the longest of any batch that ends at row j-1
        most = min(max_batch, max(1, max_tokens // max(w, 1)))  # (an empty row counts as one token)
        for i in range(max(0, j - most), j):  # largest batch first: on a tie the larger batch stays
            cost = best[i] + (j - i) * w + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches = []
    j = n
    while j > 0:
        batches.append(order[cut[j]:j])
        j = cut[j]
    return batches[::-1]


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """The tokens a plan computes, padding included."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches if b)


def cost(lengths: Sequence[int], batches: Sequence[Sequence[int]], overhead: int = OVERHEAD) -> int:
    """What ``plan`` minimises: padded tokens plus ``overhead`` per batch."""
    return padded_tokens(lengths, batches) + overhead * sum(1 for b in batches if b)


def in_order(run: Callable[[List[int]], Sequence[T]], lengths: Sequence[int], max_tokens: int = 4096,
             max_batch: int = 64, overhead: int = OVERHEAD) -> List[T]:
    """``run(indices)`` over each batch of the plan (it returns one result per index, in the
    order given), and every result in input order: entry i belongs to row i."""
    out: List[T] = [None] * len(lengths)  # type: ignore[list-item]
    for batch in plan(lengths, max_tokens, max_batch, overhead):
        results = run(batch)
        if len(results) != len(batch):
            raise ValueError(f"a batch of {len(batch)} rows gave {len(results)} results")
        for i, r in zip(batch, results):
            out[i] = r
    return out
