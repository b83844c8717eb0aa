"""Log-probabilities of token sequences under a model: per token, batched, windowed.

    from tasks.score import score_ids, score_sequences, Scorer
    lp = score_ids(m, [[eos, 10, 20, 30]])        # float32 [1, 3]: log p(10|eos), log p(20|eos 10), ...
    for i, lp in score_sequences(m, id_lists): ...  # any lengths, in input order, streamed
    scorer = Scorer(m, enc, exclude_end=False)    # precision="bf16": bfloat16 block matrices
    for s in scorer.score(["今日は良い天気です。"]):  # TextScore: text, ids, logprobs, logprob, perplexity
        print(s.text, s.logprob)

``score_ids`` is one compiled TensorFlow call on a right-padded batch of rows
of at most n_ctx tokens: the final hidden states of the positions that
predict a scored token are gathered, projected on ``wte``, log-softmaxed
(``logits - logsumexp(logits)``) and the target token's entry is gathered, all
inside one ``tf.function`` -- the [tokens, n_vocab] logits never leave the
graph, and padding gets no output projection at all.

Sequences longer than n_ctx are scored with a sliding window (``windows``):
windows of n_ctx tokens start every ``stride`` tokens (default n_ctx // 2); the
first window scores all its tokens, each later one only the tokens past the
previous window's end.  So every token is predicted from all the tokens
before it when the sequence fits in n_ctx, and otherwise from at least
n_ctx - stride and at most n_ctx - 1 tokens before it.

``score_sequences`` cuts every sequence into window rows, sorts the rows by
length, cuts them into batches of at most ``max_tokens`` padded tokens (with
as little padding as it can, ``tasks.batching.plan``; a greedy fill up to
max_tokens pads about 11% of the tokens of typical corpus lines, this about 4%) and
yields each sequence's log-probabilities in input order as soon as it and
every sequence before it are done.  Right padding never changes a row's
numbers (attention is causal), so a batch gives its rows' one-by-one results.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from model import ModelError, as_batch, import_tf

from . import batching, memory
from .errors import OptionError
from .vectors import in_precision

tf = import_tf()

#: Padded tokens per batch by default (the [tokens, n_vocab] logits of a batch take 4 * 20,573 bytes per token).
DEFAULT_MAX_TOKENS = 2048
DEFAULT_MAX_BATCH = 128

_SPEC = (tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32))
_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _score_graph(m, ids, lengths, first):
    """Per-token log-probabilities [B, T-1] of ids [B, T]; entry t is log p(ids[:, t+1] | ids[:, :t+1]).

    Only targets at positions first[b] <= t+1 < lengths[b] are computed; the rest are 0.
    """
    batch, length = tf.shape(ids)[0], tf.shape(ids)[1]
    h = m.graph_hidden(ids)                                          # [B, T, E] after ln_f
    target_pos = tf.range(1, length)                                 # [T-1]
    scored = tf.logical_and(target_pos[None, :] >= first[:, None], target_pos[None, :] < lengths[:, None])
    where = tf.where(scored)                                         # [N, 2] (row, t)
    hs = tf.gather_nd(h[:, :-1, :], where)                           # [N, E]: states that predict
    targets = tf.gather_nd(ids[:, 1:], where)                        # [N]
    logits = m.graph_logits(hs)                                      # [N, V]
    top = tf.reduce_max(logits, axis=-1, keepdims=True)
    lse = tf.math.log(tf.reduce_sum(tf.exp(logits - top), axis=-1)) + top[:, 0]
    chosen = tf.gather(logits, targets[:, None], batch_dims=1)[:, 0]  # [N]
    out = chosen - lse
    return tf.scatter_nd(where, out, tf.cast(tf.stack([batch, length - 1]), tf.int64))


def _function(m):
    fn = _FUNCTIONS.get(m)
    if fn is None:
        ref = weakref.ref(m)  # the cached function must not keep its model alive
        fn = tf.function(lambda ids, lengths, first: _score_graph(ref(), ids, lengths, first), input_signature=_SPEC)
        _FUNCTIONS[m] = fn
    return fn


def _check_rows(m, rows, lengths, first) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr, lens = as_batch(rows, m.hparams, lengths, advice="use score_sequences for a sliding window")
    firsts = np.ones(arr.shape[0], np.int64) if first is None else np.asarray(first, np.int64).reshape(-1)
    if firsts.shape[0] != arr.shape[0] or (firsts < 1).any():
        raise ModelError("first must give each row a position of at least 1")
    return arr, lens, firsts.astype(np.int32)


def score_ids(m, rows, lengths=None, first=None) -> np.ndarray:
    """Log-probabilities (natural log) of each row's tokens after its first: float32 [B, T-1].

    ``rows``: a batch of id lists (unequal lengths are right-padded) or a 2-D
    int array with optional ``lengths``; each row at most n_ctx tokens.
    Entry [b, t] is log p(rows[b][t+1] | rows[b][:t+1]).  ``first`` (optional,
    per row, default 1) is the first position whose token is scored; entries
    before it, and past a row's length, are 0.  Put <|endoftext|> first to
    score a text's first token, as the original gpt2-score.py does.
    """
    arr, lens, firsts = _check_rows(m, rows, lengths, first)
    if arr.shape[1] < 2:
        return np.zeros((arr.shape[0], 0), np.float32)
    with tf.device(m.device):
        out = _function(m)(tf.constant(arr), tf.constant(lens), tf.constant(firsts))
    return out.numpy()


def windows(length: int, n_ctx: int, stride: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """The sliding windows over a sequence of ``length`` tokens: (start, end, first) each.

    Window rows are seq[start:end] (at most n_ctx tokens); each scores the
    absolute positions first..end-1 (so first > start).  Windows start every
    ``stride`` tokens (default n_ctx // 2; 1 <= stride < n_ctx), the first one
    scores positions 1.., each later one the positions past the previous
    window's end, and the last window reaches the sequence's end.
    """
    stride = n_ctx // 2 if stride is None else int(stride)
    if not 1 <= stride < n_ctx:
        raise ModelError(f"stride must be between 1 and n_ctx - 1 = {n_ctx - 1}, got {stride}")
    if length < 2:
        return []
    out = [(0, min(length, n_ctx), 1)]
    while out[-1][1] < length:
        start = out[-1][0] + stride
        out.append((start, min(length, start + n_ctx), out[-1][1]))
    return out


def _plan(widths: Sequence[int], max_tokens: int, max_batch: int) -> List[List[int]]:
    """Batches of row indices with the least padding (``tasks.batching.plan``): each at most
    max_tokens padded tokens (or one row) and max_batch rows."""
    return batching.plan(widths, max_tokens, max_batch)


def _check_memory(m, widths: Sequence[int], max_tokens: int) -> None:
    """OptionError (batch_tokens) before a batch that cannot fit in memory: its padded
    tokens' logits and softmax over the vocabulary, every layer's activations, and
    the attention weights."""
    hp = m.hparams
    width = max(widths)
    tokens = len(widths) * width
    per_token = 4 * (3 * hp.n_vocab + hp.n_layer * (8 * hp.n_embd + hp.n_head * width))
    memory.check("batch_tokens", max_tokens, tokens * per_token, f"a batch of {tokens} tokens", per_unit=per_token)


def score_sequences(m, sequences: Sequence[Sequence[int]], stride: Optional[int] = None,
                    max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int = DEFAULT_MAX_BATCH,
                    stop: Optional[Callable[[], bool]] = None) -> Iterator[Tuple[int, np.ndarray]]:
    """(index, log-probabilities float32 [len(seq) - 1]) for each sequence, in input order.

    Entry i-1 is log p(seq[i] | the tokens before it), the context being
    limited by the sliding window (see ``windows``) when the sequence is
    longer than n_ctx.  A result is yielded as soon as its sequence and every
    sequence before it are done.  ``stop`` (optional) is asked before every
    batch of windows: once it says True nothing more is computed or yielded
    (a server's request that ended while one long text was being scored).
    """
    n_ctx = m.hparams.n_ctx
    seqs = [list(s) for s in sequences]
    rows = []  # (sequence index, start, end, first)
    pending = []
    for k, s in enumerate(seqs):
        ws = windows(len(s), n_ctx, stride)
        rows.extend((k, *w) for w in ws)
        pending.append(len(ws))
    out = [np.zeros(max(len(s) - 1, 0), np.float32) for s in seqs]
    emitted = 0
    while emitted < len(seqs) and pending[emitted] == 0:
        yield emitted, out[emitted]
        emitted += 1
    for batch in _plan([r[2] - r[1] for r in rows], max_tokens, max_batch):
        if stop is not None and stop():
            return
        _check_memory(m, [rows[i][2] - rows[i][1] for i in batch], max_tokens)
        picked = [rows[i] for i in batch]
        lp = score_ids(m, [seqs[k][start:end] for k, start, end, _ in picked],
                       first=[first - start for _, start, _, first in picked])
        for row, (k, start, end, first) in zip(lp, picked):
            out[k][first - 1:end - 1] = row[first - start - 1:end - start - 1]
            pending[k] -= 1
        while emitted < len(seqs) and pending[emitted] == 0:
            yield emitted, out[emitted]
            emitted += 1


# --------------------------------------------------------------------------- texts


@dataclass
class TextScore:
    """One text's score: ``ids`` are the scored tokens (the text's, plus <|endoftext|>
    unless excluded), ``logprobs`` their natural-log probabilities (float32)."""

    text: str
    ids: List[int]
    logprobs: np.ndarray

    @property
    def logprob(self) -> float:
        """Sum of the tokens' log-probabilities (in float64)."""
        return float(np.sum(self.logprobs, dtype=np.float64))

    @property
    def perplexity(self) -> float:
        """exp(-logprob / tokens)."""
        n = len(self.ids)
        if n == 0:
            return float("nan")
        try:
            return math.exp(-self.logprob / n)
        except OverflowError:
            return float("inf")


class Scorer:
    """Scores texts as the original gpt2-score.py: <|endoftext|> is put before a
    text's tokens (so the first token gets a probability) and, unless
    ``exclude_end``, after them; each of those tokens is scored.  ``precision``:
    'fp32' or 'bf16' for the forward passes (None: the model's own); ``self.model``
    is the model that computes them (the output projection and log-softmax are
    float32 either way)."""

    def __init__(self, m, enc, exclude_end: bool = False, stride: Optional[int] = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int = DEFAULT_MAX_BATCH,
                 precision: Optional[str] = None):
        n_ctx = m.hparams.n_ctx
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, (int, np.integer))
                                   or not 1 <= stride < n_ctx):
            raise OptionError("stride", f"must be below the model's context of {n_ctx} tokens (and at least 1), "
                                        f"got {stride!r}")
        self.model = in_precision(m, precision)
        self.enc = enc
        self.exclude_end = exclude_end
        self.stride = stride
        self.max_tokens = max_tokens
        self.max_batch = max_batch

    def ids(self, text: str) -> List[int]:
        """The scored tokens of a text."""
        ids = list(self.enc.encode(text)) if text else []
        if not self.exclude_end:
            ids.append(self.enc.eos_id)
        return ids

    def score_token_lists(self, id_lists: Sequence[Sequence[int]],
                          stop: Optional[Callable[[], bool]] = None) -> Iterator[Tuple[int, np.ndarray]]:
        """(index, log-probabilities) of each token list, each scored after <|endoftext|>; ``stop``: as
        ``score_sequences``'."""
        eos = self.enc.eos_id
        return score_sequences(self.model, [[eos, *ids] for ids in id_lists], stride=self.stride,
                               max_tokens=self.max_tokens, max_batch=self.max_batch, stop=stop)

    def score(self, texts: Iterable[str]) -> List[TextScore]:
        """A TextScore per text, in order."""
        return list(self.scores(texts))

    def scores(self, texts: Iterable[str]) -> Iterator[TextScore]:
        """A TextScore per text, in order, each yielded as soon as it and the ones before are done."""
        texts = list(texts)
        id_lists = [self.ids(t) for t in texts]
        for i, lp in self.score_token_lists(id_lists):
            yield TextScore(texts[i], id_lists[i], lp)
