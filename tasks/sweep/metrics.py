"""Measures of generated text, as pure functions over token id lists (usable on any text).

    from tasks.sweep import metrics as M
    M.rep_n(ids, 2)                      # share of repeated bigrams in one sample (0..1)
    M.diversity([ids_a, ids_b])          # (1 - rep-2)(1 - rep-3)(1 - rep-4), pooled over samples
    M.distinct_n([ids_a, ids_b], 2)      # unique / total bigrams across samples
    M.self_bleu(["今日は晴れ", "今日は雨"])  # mean BLEU of each text against the others (sacrebleu, chars)
    M.ends_in_loop(ids)                  # the sample ends repeating a block of tokens
    M.zipf_coefficient(id_lists)         # s of frequency ~ rank**-s, least squares on log-log
    M.bootstrap_ci(values)               # percentile interval of the mean over resampled items
    M.mauve(p_features, q_features)      # MAUVE (the mauve-text package) between two feature sets

Definitions (written for this project from the papers):

- rep-n (Welleck et al. 2020; Su & Collier 2022, "contrastive search"): 1 - |unique n-grams| / |n-grams|
  of a sequence; the papers print it x100, here it is a fraction.  Over several samples (``rep_n_pooled``)
  the unique and total counts of each sample are summed first, as Su & Collier's corpus figures are.
  Japanese has no spaces, so the units are token ids, not words.
- diversity = (1 - rep-2)(1 - rep-3)(1 - rep-4) (Su & Collier).
- distinct-n (Li et al. 2016): unique n-grams over all n-grams of a set of samples taken together.
- Self-BLEU (Zhu et al. 2018, Texygen): each sample scored with BLEU against the other samples of its
  set as references, averaged; sacrebleu's BLEU with character tokenization (no word boundaries in
  Japanese), effective order for short samples.
- Zipf coefficient (Holtzman et al. 2020): the s of frequency ∝ rank^-s, from a least-squares line
  through (log rank, log frequency) of the tokens' counts.
- a sample "ends in a loop" when its last tokens are one block of p tokens repeated: at least 3 times
  and over at least ``min_tokens`` tokens, for some p up to ``max_period``.
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

Ids = Sequence[int]


def ngrams(ids: Ids, n: int) -> List[Tuple[int, ...]]:
    """Every n-gram of ``ids`` (len(ids) - n + 1 of them; none when shorter than n)."""
    ids = [int(t) for t in ids]
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def _check_n(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")


def ngram_counts(ids: Ids, n: int) -> Tuple[int, int]:
    """(unique n-grams, all n-grams) of one sequence."""
    _check_n(n)
    grams = ngrams(ids, n)
    return len(set(grams)), len(grams)


def rep_n(ids: Ids, n: int) -> float:
    """1 - unique/total n-grams of one sequence; nan when it has no n-gram."""
    unique, total = ngram_counts(ids, n)
    return 1.0 - unique / total if total else float("nan")


def rep_n_pooled(samples: Iterable[Ids], n: int) -> float:
    """rep-n of several samples: unique and total counts of each sample summed first; nan without n-grams."""
    unique = total = 0
    for ids in samples:
        u, t = ngram_counts(ids, n)
        unique += u
        total += t
    return 1.0 - unique / total if total else float("nan")


def diversity(samples: Iterable[Ids]) -> float:
    """(1 - rep-2)(1 - rep-3)(1 - rep-4) of samples pooled (a single sample: pass [ids])."""
    samples = [list(s) for s in samples]
    out = 1.0
    for n in (2, 3, 4):
        out *= 1.0 - rep_n_pooled(samples, n)
    return out


def distinct_n(samples: Iterable[Ids], n: int) -> float:
    """Unique n-grams over all n-grams of the samples taken together; nan without n-grams."""
    _check_n(n)
    grams: List[Tuple[int, ...]] = []
    for ids in samples:
        grams.extend(ngrams(ids, n))
    return len(set(grams)) / len(grams) if grams else float("nan")


def self_bleu(texts: Sequence[str]) -> float:
    """Mean sentence BLEU (0..100) of each text against all the others (sacrebleu, character
    tokenization, effective order); nan with fewer than two texts."""
    from sacrebleu.metrics import BLEU

    texts = list(texts)
    if len(texts) < 2:
        return float("nan")
    bleu = BLEU(tokenize="char", effective_order=True)
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1:]).score for i, t in enumerate(texts)]
    return float(np.mean(scores))


def loop_period(ids: Ids, max_period: int = 32, min_tokens: int = 8, min_repeats: int = 3) -> int:
    """The shortest period p <= max_period such that the sequence ends with a block of p tokens repeated
    at least ``min_repeats`` times over at least ``min_tokens`` tokens; 0 when there is none."""
    ids = [int(t) for t in ids]
    n = len(ids)
    for p in range(1, max_period + 1):
        need = max(min_repeats * p, min_tokens)
        if need > n:
            break
        run = p  # the last run of tokens in which ids[i] == ids[i + p]
        i = n - p - 1
        while i >= 0 and ids[i] == ids[i + p]:
            run += 1
            i -= 1
        if run >= need:
            return p
    return 0


def ends_in_loop(ids: Ids, max_period: int = 32, min_tokens: int = 8, min_repeats: int = 3) -> bool:
    """Whether the sample ends repeating a block of tokens (see ``loop_period``)."""
    return loop_period(ids, max_period, min_tokens, min_repeats) > 0


def zipf_coefficient(samples: Iterable[Ids]) -> float:
    """The s of frequency ∝ rank^-s over the tokens of the samples: minus the slope of the least-squares
    line through (log rank, log count); nan with fewer than two distinct tokens."""
    counts = Counter()
    for ids in samples:
        counts.update(int(t) for t in ids)
    return zipf_of_counts(np.fromiter(counts.values(), np.float64, len(counts)))


def zipf_of_counts(counts: np.ndarray) -> float:
    """``zipf_coefficient`` from the tokens' counts (in any order; zero counts are ignored)."""
    counts = np.asarray(counts, np.float64)
    counts = counts[counts > 0]
    if len(counts) < 2:
        return float("nan")
    freq = np.sort(counts)[::-1]
    x = np.log(np.arange(1, len(freq) + 1, dtype=np.float64))
    y = np.log(freq)
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    return -slope


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays (0 where a row is all zeros)."""
    a = np.atleast_2d(np.asarray(a, np.float64))
    b = np.atleast_2d(np.asarray(b, np.float64))
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    denom = na * nb
    return np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)


def bootstrap_ci(values: Sequence[float], statistic: Optional[Callable[[np.ndarray], float]] = None,
                 resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Tuple[float, float, float]:
    """(estimate, low, high): the statistic (default the mean) of ``values`` and its percentile bootstrap
    interval over resampled values (nan entries dropped).  For a statistic of a set of items that are
    not numbers (e.g. the Zipf coefficient of per-context token lists) see ``bootstrap_items``."""
    x = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                   np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    stat = statistic or (lambda a: float(a.mean()))
    estimate = stat(x)
    if x.size == 1:
        return estimate, estimate, estimate
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, x.size, size=(resamples, x.size))
    if statistic is None:
        draws = x[picks].mean(axis=1)
    else:
        draws = np.array([stat(x[p]) for p in picks])
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return float(estimate), float(low), float(high)


def bootstrap_items(items: Sequence, statistic: Callable[[Sequence], float], resamples: int = 200,
                    level: float = 0.95, seed: int = 0) -> Tuple[float, float, float]:
    """(estimate, low, high) of a statistic of a set of items (e.g. the Zipf coefficient of the token
    lists of the contexts), its interval from the statistic of resampled item sets."""
    items = list(items)
    if not items:
        return float("nan"), float("nan"), float("nan")
    estimate = float(statistic(items))
    if len(items) == 1:
        return estimate, estimate, estimate
    rng = np.random.default_rng(seed)
    draws = [statistic([items[i] for i in rng.integers(0, len(items), len(items))]) for _ in range(resamples)]
    draws = np.asarray([d for d in draws if not math.isnan(d)], np.float64)
    if draws.size == 0:
        return estimate, float("nan"), float("nan")
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return estimate, float(low), float(high)


def zipf_bootstrap(items: Sequence[Sequence[Ids]], resamples: int = 200, level: float = 0.95,
                   seed: int = 0) -> Tuple[float, float, float]:
    """``bootstrap_items(items, lambda t: zipf_coefficient(x for g in t for x in g), ...)`` -- the same
    numbers, the same resamples -- with each item's (token lists') counts taken once instead of in every
    resample: a resample adds its items' counts."""
    tables = []
    for groups in items:
        ids = np.asarray([t for g in groups for t in g], np.int64)
        tokens, counts = np.unique(ids, return_counts=True)
        tables.append((tokens, counts))
    vocab = np.unique(np.concatenate([t for t, _ in tables])) if tables else np.zeros(0, np.int64)
    compact = [(np.searchsorted(vocab, t), c.astype(np.float64)) for t, c in tables]

    def statistic(chosen):
        if not chosen:
            return float("nan")
        where = np.concatenate([w for w, _ in chosen])
        return zipf_of_counts(np.bincount(where, weights=np.concatenate([c for _, c in chosen]),
                                          minlength=len(vocab)))

    return bootstrap_items(compact, statistic, resamples=resamples, level=level, seed=seed)


def mauve(p_features: np.ndarray, q_features: np.ndarray, seed: int = 25, **kwargs) -> float:
    """MAUVE (Pillutla et al. 2021) between two sets of feature vectors [N, D] and [M, D], computed by the
    ``mauve-text`` package (its quantization: PCA, k-means with N/10 clusters by default; its divergence
    curve); 1.0 means the two sets cannot be told apart.  Other keywords go to ``mauve.compute_mauve``."""
    import mauve as mauve_text

    p = np.asarray(p_features, np.float32)
    q = np.asarray(q_features, np.float32)
    with one_thread():
        out = mauve_text.compute_mauve(p_features=p, q_features=q, seed=seed, verbose=False, **kwargs)
    return float(out.mauve)


@contextlib.contextmanager
def one_thread():
    """BLAS and OpenMP (scikit-learn's PCA, faiss's k-means) on one thread inside: on a few cores their
    thread pools wake into TensorFlow's and ONNX Runtime's still-spinning threads, and a MAUVE of a hundred
    vectors took 1-10 s instead of 15-45 ms (bench/bench_sweep.py; the same result either way).
    ``threadpoolctl`` comes with scikit-learn, which mauve-text requires."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # (no scikit-learn: no MAUVE either)
        yield
        return
    with threadpool_limits(limits=1):
        yield
