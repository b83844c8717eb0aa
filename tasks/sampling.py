"""Choosing the next token: the sampler chain.

Every control is one small function over a group of rows' logits (``Rows``), vectorised over the
rows where it can be; ``chain(params)`` lists the controls a ``SamplingParams`` turns on in one
fixed, documented order (docs/sampling.md), and ``draw`` ends it.  The one generation loop
(``tasks.scheduler``) runs it for the CLI, the server and bulk jobs alike, so a control added here
reaches all of them.

The chain, in order (a control at its neutral value is not in the chain at all):

1. logit_bias, ban -- on the model's logits;
2. repetition_penalty, presence_penalty / frequency_penalty, no_repeat_ngram_size -- the penalties;
3. DRY;
4. temperature (the original's first link: the filters below see the tempered distribution);
5. top_k, typical_p, top_p, min_p, XTC -- the filters, in llama.cpp's order;
6. the <|endoftext|> ban of min_length (after the filters, as the original);
7. the draw.

The original sampler's semantics are the default chain: temperature first; then top_p when > 0
(keep the most likely tokens whose exclusive cumulative probability is below p, and every token
tied with the least likely of them), else top_k (default 40; keep every logit at least the k-th
largest, ties included); <|endoftext|> banned during the first min_length tokens; the draw.  An
explicit top_k with top_p > 0 applies both (top_k first, as llama.cpp and Hugging Face).  Filtered
logits are set to -1e10, as the original does, so that a row with nothing left falls back to a
uniform draw instead of failing; banned tokens are -inf and never drawn.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import OptionError

MASKED = np.float32(-1e10)
_F32_MAX = float(np.finfo(np.float32).max)

DEFAULT_TOP_K = 40
#: llama.cpp's default DRY sequence breakers.
DRY_BREAKERS: Tuple[str, ...] = ("\n", ":", "\"", "*")
#: The largest DRY penalty (llama.cpp caps the exponent so the penalty stays a finite float).
_DRY_MAX_PENALTY = 1e30
#: |logit_bias| at most this (large enough to force or all but forbid a token, small enough to stay
#: finite through any temperature the chain accepts).
MAX_BIAS = 1e9


def _integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        raise OptionError(name, f"{what}, got {value!r}")


def _real(name: str, value, low: float = -math.inf, high: float = math.inf, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not low <= value <= high:
        raise OptionError(name, f"{what or f'must be a number between {low} and {high}'}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn (every field at its default: the original's sampler).

    ``temperature`` 0 means greedy (argmax).  ``top_k`` None: 40, or no limit when ``top_p`` > 0
    (the original's rule); an explicit top_k with top_p > 0 applies both.  ``min_length``:
    <|endoftext|> is never drawn for the first min_length tokens of a sample.

    Penalties (neutral values: repetition 1, the others 0): ``repetition_penalty`` (Hugging Face /
    CTRL: the logit of a token in the window is divided by it when positive, multiplied when
    negative; window: the context and the sample); ``presence_penalty`` / ``frequency_penalty``
    (OpenAI: logit -= presence * [count > 0] + frequency * count, counting the tokens the sample
    drew, as OpenAI and vLLM); ``penalty_last_n``: the three look only at the last N tokens of the
    context and the sample (-1: all, the default; 0: the penalties are off; llama.cpp's default is
    64); ``no_repeat_ngram_size`` N: a token that would repeat an N-gram of the context or the
    sample is never drawn (Hugging Face).

    ``min_p``: keep the tokens at least min_p times as likely as the most likely one.
    ``typical_p``: locally typical sampling (Meister et al.), 1 = off.  DRY (llama.cpp's, off when
    ``dry_multiplier`` is 0): a token that would extend a repetition of L >= ``dry_allowed_length``
    tokens loses dry_multiplier * dry_base ** (L - dry_allowed_length) from its logit; repetitions
    do not extend across a token whose text contains one of ``dry_sequence_breakers``;
    ``dry_penalty_last_n``: the tokens looked at (-1: all, 0: DRY off).  XTC: with probability
    ``xtc_probability`` (one draw of the sample's random stream per step, only when enabled), every
    token with probability at least ``xtc_threshold`` but the least likely of them is removed.
    ``logit_bias``: {token id: bias} added to the logits (a mapping or pairs; kept as sorted pairs);
    ``ban``: token ids never drawn.
    """

    top_k: Optional[int] = None
    top_p: float = 0.0
    temperature: float = 1.0
    min_length: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = -1
    no_repeat_ngram_size: int = 0
    min_p: float = 0.0
    typical_p: float = 1.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: Tuple[str, ...] = DRY_BREAKERS
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    ban: Tuple[int, ...] = ()

    def __post_init__(self):
        if self.top_k is not None:
            _integer("top_k", self.top_k, 0)
        _real("top_p", self.top_p, 0.0, 1.0, "must be between 0 and 1")
        t = self.temperature
        _real("temperature", t, 0.0, _F32_MAX, "must be positive, or 0 for greedy decoding")
        if t != 0 and np.float32(t) == 0:
            raise OptionError("temperature", f"{t} is 0 in float32 (the logits' precision): use 0 for greedy "
                                             "decoding, or a larger temperature")
        _integer("min_length", self.min_length, 0)
        rp = self.repetition_penalty
        _real("repetition_penalty", rp, what="must be a positive number (1 = off)")
        if not rp > 0:
            raise OptionError("repetition_penalty", f"must be a positive number (1 = off), got {rp!r}")
        _real("presence_penalty", self.presence_penalty, -100.0, 100.0)
        _real("frequency_penalty", self.frequency_penalty, -100.0, 100.0)
        _integer("penalty_last_n", self.penalty_last_n, -1)
        _integer("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        _real("min_p", self.min_p, 0.0, 1.0, "must be between 0 and 1")
        _real("typical_p", self.typical_p, 0.0, 1.0, "must be between 0 and 1")
        if self.typical_p == 0:
            raise OptionError("typical_p", "must be above 0 (1 = off), got 0")
        _real("dry_multiplier", self.dry_multiplier, 0.0, what="must not be negative (0 = off)")
        _real("dry_base", self.dry_base, 1.0, what="must be at least 1")
        _integer("dry_allowed_length", self.dry_allowed_length, 1)
        _integer("dry_penalty_last_n", self.dry_penalty_last_n, -1)
        breakers = self.dry_sequence_breakers
        if isinstance(breakers, str) or not all(isinstance(b, str) and b for b in breakers):
            raise OptionError("dry_sequence_breakers", f"must be a sequence of non-empty strings, got {breakers!r}")
        object.__setattr__(self, "dry_sequence_breakers", tuple(breakers))
        _real("xtc_probability", self.xtc_probability, 0.0, 1.0, "must be between 0 and 1")
        _real("xtc_threshold", self.xtc_threshold, 0.0, 1.0, "must be between 0 and 1")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        ban = self.ban
        if isinstance(ban, (str, bytes)) or not all(_token_id(i) for i in ban):
            raise OptionError("ban", f"must be token ids (integers from 0), got {ban!r}")
        object.__setattr__(self, "ban", tuple(sorted({int(i) for i in ban})))

    @property
    def effective_top_k(self) -> int:
        """The top_k the chain applies (0: none): an explicit top_k, else 40 unless top_p > 0."""
        if self.top_k is not None:
            return int(self.top_k)
        return 0 if self.top_p > 0 else DEFAULT_TOP_K

    def token_ids(self) -> List[int]:
        """Every token id these settings name (logit_bias and ban), to check against a vocabulary."""
        return [i for i, _ in self.logit_bias] + list(self.ban)

    def check_model(self, hparams) -> None:
        """The checks that need the model, for every front end: min_length below n_ctx/2 (the
        original's rewind starts from the context, which is at most n_ctx/2 tokens) and the
        token ids of logit_bias and ban in the vocabulary.  OptionError otherwise."""
        half = hparams.n_ctx // 2
        if self.min_length >= half:
            raise OptionError("min_length", f"must be below n_ctx/2 = {half}, got {self.min_length}")
        self.check_vocabulary(hparams.n_vocab)

    def check_vocabulary(self, n_vocab: int) -> None:
        """OptionError when logit_bias or ban names a token id the vocabulary does not have."""
        for name, ids in (("logit_bias", [i for i, _ in self.logit_bias]), ("ban", self.ban)):
            bad = [i for i in ids if i >= n_vocab]
            if bad:
                raise OptionError(name, f"names token id {bad[0]}, which is not in the vocabulary "
                                        f"(ids are 0 .. {n_vocab - 1})")

    def neutral(self) -> bool:
        """Whether every control beyond the original's four is off (the chain is the original's)."""
        return chain(self) == chain(SamplingParams(self.top_k, self.top_p, self.temperature, self.min_length))


def _token_id(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 0


def _bias_pairs(bias) -> Tuple[Tuple[int, float], ...]:
    items = bias.items() if isinstance(bias, Mapping) else bias
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise OptionError("logit_bias", f"must map token ids to biases, got {bias!r}") from None
    merged: Dict[int, float] = {}
    for k, v in pairs:
        if isinstance(k, str) and k.isdigit():  # JSON object keys (OpenAI's logit_bias) are strings
            k = int(k)
        if not _token_id(k):
            raise OptionError("logit_bias", f"keys must be token ids (integers from 0), got {k!r}")
        _real("logit_bias", v, -MAX_BIAS, MAX_BIAS, f"biases must be numbers between {-MAX_BIAS:g} and {MAX_BIAS:g}")
        merged[int(k)] = float(v)
    return tuple(sorted(merged.items()))


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
    the model sees them; ``steps[b]``: tokens drawn so far for that sample (the last ``steps[b]``
    of its history); ``rngs[b]``: its random stream; ``eos``: the <|endoftext|> id; ``enc``: the
    encoder (what DRY's sequence breakers are found with; None where no control needs it).
    """

    __slots__ = ("logits", "greedy", "history", "steps", "rngs", "eos", "enc")

    def __init__(self, logits, history, steps, rngs, eos: int, enc=None):
        self.logits = np.array(logits, dtype=np.float32, copy=True)
        self.greedy = np.zeros(self.logits.shape[0], dtype=bool)
        self.history = history
        self.steps = np.asarray(steps, dtype=np.int64)
        self.rngs = rngs
        self.eos = eos
        self.enc = enc

    def sampling_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.greedy)

    def tokens(self, b: int, last_n: int = -1) -> np.ndarray:
        """Row b's history as int64 (its last ``last_n`` tokens; -1: all of it)."""
        h = np.asarray(self.history[b], dtype=np.int64)
        return h if last_n < 0 else h[len(h) - min(last_n, len(h)):]


def _mask(sub: np.ndarray, where: np.ndarray) -> None:
    """Filter the logits ``where`` says (to MASKED); a banned token (-inf) stays banned."""
    sub[where & (sub != -np.inf)] = MASKED


# Each control: f(rows, params) -> None, changing rows.logits (and rows.greedy) in place.
# Filters mask with MASKED (-1e10, the original's value: a row with nothing left is then drawn
# uniformly); bans use -inf (never drawn).  Filters leave greedy rows alone (their argmax is kept).


def apply_logit_bias(rows: Rows, params: SamplingParams) -> None:
    """logit += bias for every (token id, bias) of ``logit_bias``, on every row."""
    ids = np.fromiter((i for i, _ in params.logit_bias), np.int64)
    bias = np.fromiter((v for _, v in params.logit_bias), np.float32)
    rows.logits[:, ids] += bias


def apply_ban(rows: Rows, params: SamplingParams) -> None:
    """The tokens of ``ban`` are never drawn."""
    rows.logits[:, list(params.ban)] = -np.inf


def apply_repetition_penalty(rows: Rows, params: SamplingParams) -> None:
    """Every token in the window (the last penalty_last_n tokens of context and sample): logit / R
    when positive, logit * R otherwise (Hugging Face's RepetitionPenaltyLogitsProcessor, CTRL)."""
    r = np.float32(params.repetition_penalty)
    for b in range(rows.logits.shape[0]):
        seen = np.unique(rows.tokens(b, params.penalty_last_n))
        if seen.size:
            v = rows.logits[b, seen]
            rows.logits[b, seen] = np.where(v > 0, v / r, v * r)


def apply_presence_frequency(rows: Rows, params: SamplingParams) -> None:
    """OpenAI's penalties: logit -= presence * [count > 0] + frequency * count, where count is how
    often the sample drew the token, within the last penalty_last_n tokens of context and sample."""
    for b in range(rows.logits.shape[0]):
        h = rows.tokens(b, params.penalty_last_n)
        drawn = h[max(0, len(h) - int(rows.steps[b])):] if rows.steps[b] > 0 else h[:0]
        if not drawn.size:
            continue
        ids, counts = np.unique(drawn, return_counts=True)
        rows.logits[b, ids] -= (params.presence_penalty + params.frequency_penalty * counts).astype(np.float32)


def apply_no_repeat_ngram(rows: Rows, params: SamplingParams) -> None:
    """A token that would complete an N-gram already in the context or the sample is banned
    (Hugging Face's no_repeat_ngram_size)."""
    n = params.no_repeat_ngram_size
    for b in range(rows.logits.shape[0]):
        h = rows.tokens(b)
        m = len(h)
        if m < n:
            continue
        if n == 1:
            banned = h
        else:
            windows = np.lib.stride_tricks.sliding_window_view(h[:m - 1], n - 1)  # starts 0 .. m-n
            same = (windows == h[m - n + 1:]).all(axis=1)
            banned = h[np.flatnonzero(same) + n - 1]
        rows.logits[b, banned] = -np.inf


_TOKEN_TEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def breaker_ids(enc, breakers: Tuple[str, ...]) -> np.ndarray:
    """The ids of the tokens whose text holds one of ``breakers`` (computed once per encoder and
    breakers)."""
    cache = _TOKEN_TEXTS.get(enc)
    if cache is None:
        cache = {"texts": [enc.decode([i]) for i in range(len(enc))]}
        _TOKEN_TEXTS[enc] = cache
    ids = cache.get(breakers)
    if ids is None:
        ids = np.array([i for i, text in enumerate(cache["texts"]) if any(s in text for s in breakers)], np.int64)
        cache[breakers] = ids
    return ids


def apply_dry(rows: Rows, params: SamplingParams) -> None:
    """DRY ("don't repeat yourself", llama.cpp's): for every earlier place where the end of the
    history already occurred (L tokens long, not reaching back over a sequence breaker), the token
    that followed it loses dry_multiplier * dry_base ** (L - dry_allowed_length) when L >=
    dry_allowed_length (the longest L counts)."""
    mult, base, allowed = params.dry_multiplier, params.dry_base, params.dry_allowed_length
    if params.dry_sequence_breakers:
        if rows.enc is None:
            raise ValueError("DRY's sequence breakers need the encoder (Rows(..., enc=...))")
        breakers = breaker_ids(rows.enc, params.dry_sequence_breakers)
    else:
        breakers = np.zeros(0, np.int64)
    # beyond this length the penalty stops growing (it would overflow)
    top = 0 if base == 1 else int(math.log(_DRY_MAX_PENALTY / mult) / math.log(base))
    longest = allowed + max(top, 0)
    for b in range(rows.logits.shape[0]):
        h = rows.tokens(b, params.dry_penalty_last_n)
        n = len(h)
        if n < 2:
            continue
        breaks = np.flatnonzero(np.isin(h, breakers)) if breakers.size else breakers
        limit = n - 1 - int(breaks[-1]) if breaks.size else n  # tokens at the end before a breaker
        limit = min(limit, longest)
        if limit < 1:
            continue
        starts = np.flatnonzero(h[:n - 1] == h[n - 1])  # earlier places ending with the last token
        if not starts.size:
            continue
        length = np.ones(starts.size, np.int64)  # tokens matched so far (the last one)
        alive = np.arange(starts.size)
        k = 1
        while alive.size and k < limit:  # compare up to 32 tokens further back at once
            offsets = k + np.arange(min(32, limit - k))
            back = starts[alive][:, None] - offsets
            same = (back >= 0) & (h[np.maximum(back, 0)] == h[n - 1 - offsets])
            run = np.where(same.all(axis=1), offsets.size, same.argmin(axis=1))
            length[alive] += run
            alive = alive[run == offsets.size]
            k += offsets.size
        hit = length >= allowed
        if not hit.any():
            continue
        follow = h[starts[hit] + 1]
        worst = np.zeros(rows.logits.shape[1], np.int64)
        np.maximum.at(worst, follow, length[hit])
        ids = np.flatnonzero(worst)
        penalty = mult * np.power(float(base), np.minimum(worst[ids] - allowed, max(top, 0)))
        rows.logits[b, ids] -= penalty.astype(np.float32)


def apply_temperature(rows: Rows, params: SamplingParams) -> None:
    t = params.temperature
    if t == 0.0:
        rows.greedy[:] = True
        return
    if t == 1.0:
        return
    with np.errstate(over="ignore"):
        scaled = rows.logits / np.float32(t)
    # a temperature so small that logits / T overflows float32: its limit, greedy (on the raw
    # logits); a banned token (-inf already) is no overflow
    finite = ~(np.isinf(scaled) & np.isfinite(rows.logits)).any(axis=1)
    rows.logits[finite] = scaled[finite]
    rows.greedy |= ~finite


def apply_top_k(rows: Rows, params: SamplingParams) -> None:
    """Keep every logit at least the k-th largest (ties included)."""
    k = params.effective_top_k
    n = rows.logits.shape[1]
    idx = rows.sampling_rows()
    if not 0 < k < n or idx.size == 0:
        return
    sub = rows.logits[idx]
    kth = sub.max(axis=1) if k == 1 else np.partition(sub, n - k, axis=1)[:, n - k]
    _mask(sub, sub < kth[:, None])
    rows.logits[idx] = sub


def _log_probs(values: np.ndarray) -> np.ndarray:
    """log softmax of logits [n] in float64."""
    values = values.astype(np.float64)
    top = values.max()
    return values - top - np.log(np.exp(values - top).sum())


def _filter_live(rows: Rows, drop: Callable[[np.ndarray], np.ndarray]) -> None:
    """For every sampling row: ``drop(values)`` over the logits still in play (> MASKED; after
    top_k only a few) says which of them are filtered out."""
    for b in rows.sampling_rows():
        row = rows.logits[b]
        live = np.flatnonzero(row > MASKED)
        if live.size > 1:
            row[live[drop(row[live])]] = MASKED


def _typical_drop(values: np.ndarray, mass: float) -> np.ndarray:
    logp = _log_probs(values)
    p = np.exp(logp)
    entropy = -(p * logp).sum()
    score = np.abs(-logp - entropy)
    first = 512  # the best ranked tokens usually hold the mass: rank those alone when they do
    if values.size > first:
        best = np.argpartition(score, first - 1)[:first]
        order = best[np.argsort(score[best])]
        cum = np.cumsum(p[order])
        if cum[-1] >= mass:
            return score > score[order[int((cum < mass).sum())]]
    order = np.argsort(score)
    cum = np.cumsum(p[order])
    last = min(int((cum < mass).sum()), values.size - 1)  # the token whose probability reaches it
    return score > score[order[last]]


def apply_typical(rows: Rows, params: SamplingParams) -> None:
    """Locally typical sampling (Meister et al. 2022): rank tokens by |-log p - H| (H the entropy)
    and keep the smallest set of the best ranked whose probability reaches typical_p (every token
    tied with the last one kept included)."""
    _filter_live(rows, lambda v: _typical_drop(v, params.typical_p))


def _top_p_drop(values: np.ndarray, p: float) -> np.ndarray:
    ordered = np.sort(values)[::-1]
    z = np.exp(ordered - ordered[0], dtype=np.float64)
    probs = z / z.sum()
    exclusive = np.cumsum(probs) - probs
    kept = exclusive < p
    kept[0] = True
    return values < ordered[kept].min()


def apply_top_p(rows: Rows, params: SamplingParams) -> None:
    """Keep the smallest set of most likely tokens whose exclusive cumulative probability is below p
    (at least the most likely one, and every token tied with the least likely kept one)."""
    idx = rows.sampling_rows()
    if params.top_p <= 0.0 or idx.size == 0:
        return
    sub = rows.logits[idx]
    if not (sub > MASKED).all():  # after top_k (or a ban): over the tokens still in play
        _filter_live(rows, lambda v: _top_p_drop(v, params.top_p))
        return
    # the original's case (every token in play), vectorised over the rows
    ordered = np.sort(sub, axis=1)[:, ::-1]
    z = np.exp(ordered - ordered[:, :1], dtype=np.float64)
    probs = z / z.sum(axis=1, keepdims=True)
    exclusive = np.cumsum(probs, axis=1) - probs
    kept = exclusive < params.top_p
    kept[:, 0] = True  # the most likely token always stays
    threshold = np.where(kept, ordered, np.inf).min(axis=1)
    _mask(sub, sub < threshold[:, None])
    rows.logits[idx] = sub


def apply_min_p(rows: Rows, params: SamplingParams) -> None:
    """Keep the tokens whose probability is at least min_p times the most likely token's."""
    floor = math.log(params.min_p)
    _filter_live(rows, lambda v: v.astype(np.float64) - float(v.max()) < floor)  # log(p / p_max)


def apply_xtc(rows: Rows, params: SamplingParams) -> None:
    """XTC ("exclude top choices", llama.cpp's): with probability xtc_probability (one number of
    the row's random stream), when two tokens or more have probability >= xtc_threshold, all of
    them but the least likely are removed."""
    for b in rows.sampling_rows():
        if rows.rngs[b].random() >= params.xtc_probability:
            continue
        row = rows.logits[b]
        live = np.flatnonzero(row > MASKED)
        values = row[live]
        top = np.flatnonzero(np.exp(_log_probs(values)) >= params.xtc_threshold) if live.size else live
        if top.size >= 2:
            least = values[top].min()
            row[live[top[values[top] > least]]] = MASKED


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


Link = Callable[[Rows, SamplingParams], None]


def chain(params: SamplingParams) -> List[Link]:
    """The controls ``params`` turns on, in the chain's fixed order (see the module and
    docs/sampling.md); the draw follows them.  With every control beyond the original's at its
    neutral value: temperature, then top_p or top_k, the <|endoftext|> ban of min_length."""
    links: List[Link] = []
    if params.logit_bias:
        links.append(apply_logit_bias)
    if params.ban:
        links.append(apply_ban)
    if params.penalty_last_n != 0:
        if params.repetition_penalty != 1.0:
            links.append(apply_repetition_penalty)
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            links.append(apply_presence_frequency)
    if params.no_repeat_ngram_size:
        links.append(apply_no_repeat_ngram)
    if params.dry_multiplier > 0 and params.dry_penalty_last_n != 0:
        links.append(apply_dry)
    links.append(apply_temperature)
    if params.effective_top_k > 0:
        links.append(apply_top_k)
    if params.typical_p < 1.0:
        links.append(apply_typical)
    if params.top_p > 0.0:
        links.append(apply_top_p)
    if params.min_p > 0.0:
        links.append(apply_min_p)
    if params.xtc_probability > 0.0 and params.xtc_threshold <= 0.5:  # above 0.5: never two tokens
        links.append(apply_xtc)
    if params.min_length:
        links.append(apply_min_length)
    return links


def sample(rows: Rows, params: SamplingParams) -> np.ndarray:
    """Run the chain of ``params`` over ``rows`` and draw one token per row."""
    for link in chain(params):
        link(rows, params)
    return draw(rows)


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           forbid: int | None = None, history: Sequence[int] = (), steps: int = 0, enc=None) -> int:
    """One token from one row of logits [n_vocab] (the chain over a single row).

    ``forbid``: a token id that must not be drawn (as <|endoftext|> during the first min_length
    tokens); like the original, it is removed after the top-k/top-p filter.  ``history``: the
    context and the tokens drawn so far (``steps`` of them, at its end) for the penalties; ``enc``:
    the encoder, for DRY's sequence breakers.
    """
    rows = Rows(np.asarray(logits, dtype=np.float32)[None], [np.asarray(history, np.int64)],
                [steps], [rng], eos=-1 if forbid is None else forbid, enc=enc)
    if forbid is not None:
        params = replace(params, min_length=max(steps + 1, params.min_length))
    return int(sample(rows, params)[0])


def _draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability softmax(logits)."""
    cdf = np.cumsum(softmax(logits))
    u = rng.random() * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), logits.shape[0] - 1)
