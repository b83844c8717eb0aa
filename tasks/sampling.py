"""Choosing the next token: temperature, top-p / top-k, and sampling.

Small functions over numpy logits, with the original sampler's semantics:
temperature first; then top_p when > 0 (keep the most likely tokens whose
exclusive cumulative probability is below p, and every token tied with the
least likely of them), else top_k when > 0 (keep every logit at least the
k-th largest, ties included), else the full distribution.  Filtered logits
are set to -1e10, as the original does, so that a row with nothing left
falls back to a uniform draw instead of failing.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           forbid: int | None = None) -> int:
    """One token from one row of logits [n_vocab].

    ``forbid``: a token id that must not be drawn (<|endoftext|> during the
    first min_length tokens); like the original, it is removed after the
    top-k/top-p filter.
    """
    logits = np.asarray(logits, dtype=np.float32)
    greedy = params.temperature == 0.0
    if not greedy and params.temperature != 1.0:
        with np.errstate(over="ignore"):
            scaled = logits / np.float32(params.temperature)
        if np.isfinite(scaled).all():
            logits = scaled
        else:  # a temperature so small that logits / T overflows float32: its limit, greedy
            greedy = True
    if greedy:
        if forbid is not None:
            logits = logits.copy()
            logits[forbid] = -np.inf
        return int(np.argmax(logits))
    if params.top_p > 0.0:
        logits = top_p_filter(logits, params.top_p)
    elif 0 < params.top_k < logits.shape[0]:
        # Only the kept tokens can be drawn: work on them alone.  The draw
        # is the same as over the whole masked row (masked tokens have
        # probability 0 and do not move the cumulative sums).
        n = logits.shape[0]
        kth = logits.max() if params.top_k == 1 else np.partition(logits, n - params.top_k)[n - params.top_k]
        kept = np.flatnonzero(logits >= kth)
        if forbid is not None:
            kept = kept[kept != forbid]
        if kept.size:
            return int(kept[_draw(logits[kept], rng)])
        logits = np.full_like(logits, MASKED)  # only the forbidden token was kept: uniform, as the original
    if forbid is not None:
        logits = np.array(logits)
        logits[forbid] = -np.inf
    return _draw(logits, rng)


def _draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability softmax(logits)."""
    cdf = np.cumsum(softmax(logits))
    u = rng.random() * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), logits.shape[0] - 1)
