"""The sweep's forward passes: log-probabilities and sentence vectors of many rows, computed together.

    from tasks.sweep.passes import forward_rows
    logprobs, vectors = forward_rows(m, score_rows=[([eos, 5, 6, 7], 1)], vector_rows=[[5, 6, 7]])
    # logprobs[0]: float32 [3], log p(5 | eos), log p(6 | eos 5), log p(7 | eos 5 6)
    # vectors[0]: float32 [n_embd], the mean of the final layer-normed hidden states at 5 6 7 read after eos
    # vectors[1]: float32 [n_embd], the mean of the final layer-normed hidden states of 5 6 7 read alone

Score rows (``(ids, first)``: the tokens at positions first.. are scored, as ``tasks.score.score_ids``)
and vector rows (``ids``: mean pooling of the final hidden states, as ``tasks.vectors.Vectorizer`` with
``pooling="mean"``, ``layer=-1``; from position ``vector_from[i]`` on where given) of at most n_ctx tokens
go into the same batches -- one plan of the one planner (``tasks.batching.plan``) over all of them, one
compiled call per batch: a vector row costs its forward pass and nothing more (no output projection), a
score row the projection of its scored positions only, and its vector -- pooled over the positions it
scores -- comes with it at no cost.  Right padding changes a row's numbers only by float rounding
(attention is causal), so the results are ``score_ids``' and ``Vectorizer``'s up to that rounding
(tests/test_sweep.py checks it).
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Sequence, Tuple

import numpy as np

from model import import_tf

from .. import batching

tf = import_tf()

#: Padded tokens per batch (as ``tasks.score``: the logits of a batch's scored tokens stay inside the graph).
MAX_TOKENS = 2048
MAX_BATCH = 128

_SPEC = (tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32),
         tf.TensorSpec([None], tf.int32))
_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _graph(m, ids, lengths, first, pool_from):
    """(log-probabilities [B, T-1]: entry t is log p(ids[b, t+1] | ids[b, :t+1]) for first[b] <= t+1 <
    lengths[b], else 0; the mean of the final hidden states over each row's positions pool_from[b] ..
    lengths[b] - 1 [B, E]; the final hidden state at its last position [B, E])."""
    batch, length = tf.shape(ids)[0], tf.shape(ids)[1]
    h = m.graph_hidden(ids)                                                   # [B, T, E]
    positions = tf.range(length)
    valid = tf.logical_and(positions[None, :] < lengths[:, None], positions[None, :] >= pool_from[:, None])
    mean = (tf.reduce_sum(h * tf.cast(valid, h.dtype)[:, :, None], axis=1)
            / tf.cast(lengths - pool_from, h.dtype)[:, None])
    last = tf.gather(h, lengths - 1, batch_dims=1)                            # [B, E]
    target = positions[1:]
    scored = tf.logical_and(target[None, :] >= first[:, None], target[None, :] < lengths[:, None])
    where = tf.where(scored)                                                  # [N, 2]
    logits = m.graph_logits(tf.gather_nd(h[:, :-1, :], where))                # [N, V]
    targets = tf.gather_nd(ids[:, 1:], where)
    top = tf.reduce_max(logits, axis=-1, keepdims=True)
    lse = tf.math.log(tf.reduce_sum(tf.exp(logits - top), axis=-1)) + top[:, 0]
    chosen = tf.gather(logits, targets[:, None], batch_dims=1)[:, 0]
    lp = tf.scatter_nd(where, chosen - lse, tf.cast(tf.stack([batch, length - 1]), tf.int64))
    return lp, mean, last


def _function(m):
    fn = _FUNCTIONS.get(m)
    if fn is None:
        ref = weakref.ref(m)  # the cached function must not keep its model alive
        fn = tf.function(lambda ids, lengths, first, pool_from: _graph(ref(), ids, lengths, first, pool_from),
                         input_signature=_SPEC)
        _FUNCTIONS[m] = fn
    return fn


def forward_rows(m, score_rows: Sequence[Tuple[Sequence[int], int]] = (), vector_rows: Sequence[Sequence[int]] = (),
                 pooling: str = "mean", max_tokens: int = MAX_TOKENS, max_batch: int = MAX_BATCH,
                 vector_from: Optional[Sequence[int]] = None) -> Tuple[List[np.ndarray], np.ndarray]:
    """(for each score row (ids, first): the log-probabilities float32 [len(ids) - first] of its tokens
    from position ``first`` on; vectors float32 [len(score_rows) + len(vector_rows), n_embd], ``pooling``
    'mean' or 'last' as ``Vectorizer``'s: first one per score row, over the positions it scores (``first``
    on), then one per vector row, over its positions from ``vector_from[i]`` on (default 0: all of them)).
    Every row holds 1..n_ctx tokens; a score row's ``first`` is at least 1 and below its length; a vector
    row's ``vector_from`` is below its length."""
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    n_ctx = m.hparams.n_ctx
    if vector_from is None:
        vector_from = [0] * len(vector_rows)
    if len(vector_from) != len(vector_rows):
        raise ValueError(f"{len(vector_from)} vector_from for {len(vector_rows)} vector rows")
    rows = [list(ids) for ids, _ in score_rows] + [list(ids) for ids in vector_rows]
    firsts = [int(f) for _, f in score_rows] + [len(ids) for ids in vector_rows]  # a vector row scores nothing
    pools = [int(f) for _, f in score_rows] + [int(f) for f in vector_from]
    for ids, f, p in zip(rows, firsts, pools):
        if not 1 <= len(ids) <= n_ctx or f < 1 or not 0 <= p < len(ids):
            raise ValueError(f"a row of {len(ids)} tokens (first {f}, pooled from {p}): rows hold 1..{n_ctx} "
                             "tokens, score from 1 on and pool at least their last position")
    n_score = len(score_rows)
    logprobs: List[np.ndarray] = [np.zeros(0, np.float32)] * n_score
    vectors = np.zeros((len(rows), m.hparams.n_embd), np.float32)
    fn = _function(m)
    for batch in batching.plan([len(r) for r in rows], max_tokens, max_batch):
        width = max(len(rows[i]) for i in batch)
        arr = np.zeros((len(batch), width), np.int32)
        for b, i in enumerate(batch):
            arr[b, :len(rows[i])] = rows[i]
        lens = np.array([len(rows[i]) for i in batch], np.int32)
        first = np.array([firsts[i] for i in batch], np.int32)
        pool = np.array([pools[i] for i in batch], np.int32)
        with tf.device(m.device):
            lp, mean, last = fn(tf.constant(arr), tf.constant(lens), tf.constant(first), tf.constant(pool))
        lp, pooled = lp.numpy(), (mean if pooling == "mean" else last).numpy()
        for b, i in enumerate(batch):
            if i < n_score:
                logprobs[i] = lp[b, firsts[i] - 1:lens[b] - 1].copy()
            vectors[i] = pooled[b]
    return logprobs, vectors
