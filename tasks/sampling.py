"""Choosing the next token: the sampler chain.

Every control is one small function over a group of rows' logits (``Rows``), vectorised over the
rows; ``chain(params)`` lists the controls a ``SamplingParams`` turns on in one fixed, documented
order (docs/sampling.md), and ``draw`` ends it.  The one generation loop (``tasks.scheduler``)
runs it for the CLI, the server and bulk jobs alike, so a control added here reaches all of them.

The original sampler's semantics are the default chain: temperature first; then top_p when > 0
(keep the most likely tokens whose exclusive cumulative probability is below p, and every token
tied with the least likely of them), else top_k when > 0 (keep every logit at least the k-th
largest, ties included), else the full distribution; <|endoftext|> banned during the first
min_length tokens; the draw.  Filtered logits are set to -1e10, as the original does, so that a
row with nothing left falls back to a uniform draw instead of failing.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Sequence

import numpy as np

from .errors import OptionError

MASKED = np.float32(-1e10)
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn.  ``temperature`` 0 means greedy (argmax).

    ``min_length``: <|endoftext|> is never drawn for the first min_length
    tokens of a sample.
    """

    top_k: int = 40
    top_p: float = 0.0
    temperature: float = 1.0
    min_length: int = 0

    def __post_init__(self):
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise OptionError("top_k", f"must not be negative, got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise OptionError("top_p", f"must be between 0 and 1, got {self.top_p}")
        t = self.temperature
        if not (0.0 <= t <= _F32_MAX):
            raise OptionError("temperature", f"must be positive, or 0 for greedy decoding, got {t}")
        if t != 0 and np.float32(t) == 0:
            raise OptionError("temperature", f"{t} is 0 in float32 (the logits' precision): use 0 for greedy "
                                             "decoding, or a larger temperature")
        if isinstance(self.min_length, bool) or not isinstance(self.min_length, (int, np.integer)) \
                or self.min_length < 0:
            raise OptionError("min_length", f"must not be negative, got {self.min_length!r}")


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Logits [n] with every value below the k-th largest set to -1e10."""
    n = logits.shape[-1]
    if k <= 0 or k >= n:
        return logits
    kth = logits.max() if k == 1 else np.partition(logits, n - k)[n - k]
    return np.where(logits < kth, MASKED, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Logits [n] keeping the smallest set of most likely tokens whose
    exclusive cumulative probability is below p (at least the most likely
    one, and every token tied with the least likely kept one)."""
    if p <= 0.0:
        return logits
    ordered = np.sort(logits)[::-1]
    probs = softmax(ordered)
    exclusive = np.cumsum(probs) - probs
    kept = ordered[exclusive < p]
    threshold = kept.min() if kept.size else ordered[0]
    return np.where(logits < threshold, MASKED, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(), dtype=np.float64)
    return z / z.sum()


# -- the sampler chain ------------------------------------------------------------------------------


class Rows:
    """What the chain works on: one group of rows sharing their ``SamplingParams``.

    ``logits`` [B, n_vocab] float32 (a working copy the controls change in place); ``greedy``:
    the rows that take the most likely token (temperature 0, or logits / T overflowing);
    ``history[b]``: the tokens row b's sample continues -- its context and what it drew so far, as
    the model sees them; ``steps[b]``: tokens drawn so far for that sample; ``rngs[b]``: its random
    stream; ``eos``: the <|endoftext|> id.
    """

    __slots__ = ("logits", "greedy", "history", "steps", "rngs", "eos")

    def __init__(self, logits, history, steps, rngs, eos: int):
        self.logits = np.array(logits, dtype=np.float32, copy=True)
        self.greedy = np.zeros(self.logits.shape[0], dtype=bool)
        self.history = history
        self.steps = np.asarray(steps, dtype=np.int64)
        self.rngs = rngs
        self.eos = eos

    def sampling_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.greedy)


# Each control: f(rows, params) -> None, changing rows.logits (and rows.greedy) in place.
# Filters mask with MASKED (-1e10, the original's value: a row with nothing left is then drawn
# uniformly); bans use -inf (never drawn).  Filters leave greedy rows alone (their argmax is kept).


def apply_temperature(rows: Rows, params: SamplingParams) -> None:
    t = params.temperature
    if t == 0.0:
        rows.greedy[:] = True
        return
    if t == 1.0:
        return
    with np.errstate(over="ignore"):
        scaled = rows.logits / np.float32(t)
    finite = np.isfinite(scaled).all(axis=1)
    # a temperature so small that logits / T overflows float32: its limit, greedy (on the raw logits)
    rows.logits[finite] = scaled[finite]
    rows.greedy |= ~finite


def apply_top_k(rows: Rows, params: SamplingParams) -> None:
    """Keep every logit at least the k-th largest (ties included)."""
    k = params.top_k
    n = rows.logits.shape[1]
    idx = rows.sampling_rows()
    if not 0 < k < n or idx.size == 0:
        return
    sub = rows.logits[idx]
    kth = sub.max(axis=1) if k == 1 else np.partition(sub, n - k, axis=1)[:, n - k]
    sub[sub < kth[:, None]] = MASKED
    rows.logits[idx] = sub


def apply_top_p(rows: Rows, params: SamplingParams) -> None:
    """Keep the smallest set of most likely tokens whose exclusive cumulative probability is below p
    (at least the most likely one, and every token tied with the least likely kept one)."""
    idx = rows.sampling_rows()
    if params.top_p <= 0.0 or idx.size == 0:
        return
    sub = rows.logits[idx]
    ordered = np.sort(sub, axis=1)[:, ::-1]
    z = np.exp(ordered - ordered[:, :1], dtype=np.float64)
    probs = z / z.sum(axis=1, keepdims=True)
    exclusive = np.cumsum(probs, axis=1) - probs
    kept = exclusive < params.top_p
    kept[:, 0] = True  # the most likely token always stays
    threshold = np.where(kept, ordered, np.inf).min(axis=1)
    sub[sub < threshold[:, None]] = MASKED
    rows.logits[idx] = sub


def apply_min_length(rows: Rows, params: SamplingParams) -> None:
    """<|endoftext|> is never drawn during a sample's first ``min_length`` tokens."""
    if params.min_length:
        rows.logits[rows.steps < params.min_length, rows.eos] = -np.inf


def draw(rows: Rows) -> np.ndarray:
    """The last link: greedy rows take their argmax; the others draw from softmax(logits) over the
    tokens still in play (a row with nothing left in play draws uniformly, as the original)."""
    tokens = np.empty(rows.logits.shape[0], dtype=np.int64)
    for b, row in enumerate(rows.logits):
        if rows.greedy[b]:
            tokens[b] = int(np.argmax(row))
            continue
        kept = np.flatnonzero(row > MASKED)
        if kept.size:
            tokens[b] = kept[_draw(row[kept], rows.rngs[b])]
        else:
            tokens[b] = _draw(row, rows.rngs[b])
    return tokens


def chain(params: SamplingParams) -> List[Callable[[Rows, SamplingParams], None]]:
    """The controls ``params`` turns on, in the chain's fixed order (see docs/sampling.md); the
    draw follows them.  The original's chain: temperature, then top_p or top_k, the
    <|endoftext|> ban of min_length, the draw."""
    links: List[Callable[[Rows, SamplingParams], None]] = [apply_temperature]
    if params.top_p > 0.0:
        links.append(apply_top_p)
    elif params.top_k > 0:
        links.append(apply_top_k)
    if params.min_length:
        links.append(apply_min_length)
    return links


def sample(rows: Rows, params: SamplingParams) -> np.ndarray:
    """Run the chain of ``params`` over ``rows`` and draw one token per row."""
    for link in chain(params):
        link(rows, params)
    return draw(rows)


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           forbid: int | None = None, history: Sequence[int] = ()) -> int:
    """One token from one row of logits [n_vocab] (the chain over a single row).

    ``forbid``: a token id that must not be drawn (as <|endoftext|> during the first min_length
    tokens); like the original, it is removed after the top-k/top-p filter.
    """
    rows = Rows(np.asarray(logits, dtype=np.float32)[None], [np.asarray(history, np.int64)],
                [0], [rng], eos=-1 if forbid is None else forbid)
    if forbid is not None:
        params = replace(params, min_length=max(1, params.min_length))
    return int(sample(rows, params)[0])


def _draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability softmax(logits)."""
    cdf = np.cumsum(softmax(logits))
    u = rng.random() * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), logits.shape[0] - 1)
