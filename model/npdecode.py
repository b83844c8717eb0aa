"""Token-by-token decoding on the CPU with numpy over the model's weights.

Decoding one token is a chain of matrix-vector products over every weight:
memory-bound work in which TensorFlow's per-op overhead and its
matrix-vector kernels cost more than the arithmetic (measured on the
reference machine: a TF graph step runs at about 0.55 of the bandwidth
bound, this engine at about 0.9).  It computes the same GPT-2 step with
numpy over the very same weight buffers (numpy views of the model's CPU
tensors, no copy).

Every row (sequence) of a batch has its own key/value cache and its own
length, so rows of different lengths decode together, rows join and leave
at any step (continuous batching: a finished sample's place goes to the
next one), and one row can be rewound or restarted from a new window
without touching the others.  The dense parts of a step (layer norms and
every weight matrix) run over all rows at once; only the attention over
each row's own cache is done row by row, over exactly that row's length.
"""
from __future__ import annotations

import math
import time
from typing import List, Optional

import numpy as np

from .hparams import LAYER_NORM_EPSILON, HParams, layer_weights
from .rows import RowDecoder, lazy_zeros
from .threads import StepTuner, cpu_count, fixed_threads, set_blas_threads

_GELU_C = np.float32(math.sqrt(2.0 / math.pi))
_EPS = np.float32(LAYER_NORM_EPSILON)
#: Up to this many rows, ``x @ W`` is computed as one matrix-vector product
#: per row: OpenBLAS's sgemm for a few rows costs about as much as for 8
#: (it repacks the whole weight matrix), while the second and later
#: matrix-vector products over the same weights mostly read them from the
#: cache.  Measured on the reference machine (small shape, a whole decoding
#: step): 2 rows 33 ms as vectors vs 47 ms with sgemm, 3 rows 36 vs 46,
#: 4 rows 46 vs 42, 8 rows 74 vs 44.
ROWS_AS_VECTORS = 3


def _layer_norm(x, g, b):
    """Layer norm of x [..., E] into a new array."""
    inv_n = np.float32(1.0 / x.shape[-1])
    d = x - np.add.reduce(x, axis=-1, keepdims=True) * inv_n
    var = np.einsum("...i,...i->...", d, d)[..., None]
    var *= inv_n
    var += _EPS
    np.sqrt(var, out=var)
    d /= var
    d *= g
    d += b
    return d


def _gelu(x):
    """tanh-approximated gelu of x (x is overwritten)."""
    y = x * x
    y *= np.float32(0.044715)
    y += np.float32(1.0)
    y *= x
    y *= _GELU_C
    np.tanh(y, out=y)
    y += np.float32(1.0)
    x *= y
    x *= np.float32(0.5)
    return x


def _softmax_(w):
    """Softmax over the last axis, in place."""
    w -= w.max(axis=-1, keepdims=True)
    np.exp(w, out=w)
    w /= w.sum(axis=-1, keepdims=True)


#: Row counts that OpenBLAS multiplies faster when padded with zero rows
#: (measured on the reference machine, a whole decoding step of the small
#: shape: 6 rows 57.9 ms, padded to 8 50.8 ms; 14 rows 72.2 ms, padded to
#: 16 58.7 ms; 5 and 7 rows about the same either way).
PAD_ROWS = {5: 8, 6: 8, 7: 8, 13: 16, 14: 16, 15: 16}


def _mm(x, w):
    """x [B, K] @ w [K, N], one matrix-vector product per row for a few rows."""
    rows = x.shape[0]
    if rows == 1:
        return x @ w
    if rows > ROWS_AS_VECTORS:
        padded = PAD_ROWS.get(rows)
        if padded is None:
            return x @ w
        xp = np.zeros((padded, x.shape[1]), np.float32)
        xp[:rows] = x
        return (xp @ w)[:rows]
    out = np.empty((rows, w.shape[1]), np.float32)
    for r in range(rows):
        np.matmul(x[r:r + 1], w, out=out[r:r + 1])
    return out


def _block(x, p, attend, layer: int, qkv_product=_mm):
    """One transformer block on the tokens x [N, E], in place (the one block of both prefill and step).

    ``p``: the block's weights by name (``hparams.LAYER_NAMES``).
    ``attend(layer, qkv)``: the attention of the N tokens given their
    projections qkv [N, 3E] -> [N, E]; it stores their keys and values in
    the caches it serves.  ``qkv_product``: the c_attn matrix product (the
    prefill's is a plain ``@``, which for 2-3 tokens rounds differently from
    ``_mm``'s per-row products).
    """
    qkv = qkv_product(_layer_norm(x, p["ln_1/g"], p["ln_1/b"]), p["attn/c_attn/w"])
    qkv += p["attn/c_attn/b"]
    o = _mm(attend(layer, qkv), p["attn/c_proj/w"])
    o += p["attn/c_proj/b"]
    x += o
    h = _mm(_layer_norm(x, p["ln_2/g"], p["ln_2/b"]), p["mlp/c_fc/w"])
    h += p["mlp/c_fc/b"]
    o = _mm(_gelu(h), p["mlp/c_proj/w"])
    o += p["mlp/c_proj/b"]
    x += o


def _prefill_attention(row: "_RowCache", n_head: int, head_dim: int, scale):
    """``attend`` for a new row's row.n tokens: causal attention over each other, their keys and values
    stored in ``row``."""
    n = row.n
    causal = np.triu(np.full((n, n), -1e10, np.float32), 1)

    def attend(layer, qkv):
        qkv = qkv.reshape(n, 3, n_head, head_dim).transpose(1, 2, 0, 3)  # [3, H, n, D]
        q, k, v = qkv[0], qkv[1], qkv[2]
        row.k[layer, :, :n] = k
        row.v[layer, :, :n] = v
        w = q @ k.transpose(0, 2, 1)
        w *= scale
        w += causal
        _softmax_(w)
        return (w @ v).transpose(1, 0, 2).reshape(n, n_head * head_dim)

    return attend


def _step_attention(rows: "List[_RowCache]", n_head: int, head_dim: int, scale):
    """``attend`` for one new token per row: each over exactly its own row's cache (positions row.n)."""
    B = len(rows)
    a = np.empty((B, n_head, 1, head_dim), np.float32)
    flat = a.reshape(B, n_head * head_dim)

    def attend(layer, qkv):
        qkv = qkv.reshape(B, 3, n_head, head_dim)
        for j, row in enumerate(rows):
            p = row.n
            kc, vc = row.k[layer], row.v[layer]
            kc[:, p] = qkv[j, 1]
            vc[:, p] = qkv[j, 2]
            w = np.matmul(kc[:, : p + 1], qkv[j, 0, :, :, None]).reshape(n_head, 1, p + 1)  # [H, 1, n]
            w *= scale
            _softmax_(w)
            np.matmul(w, vc[:, : p + 1], out=a[j])
        return flat

    return attend


def cpu_weights(model) -> dict:
    """Numpy views (no copies) of a CPU model's weights, conv1d as [in, out]."""
    return {name: np.asarray(var.value() if hasattr(var, "value") else var)
            for name, var in model.variables.items()}


class _RowCache:
    """One row's (sequence's) key/value cache: k and v [n_layer, n_head, n_ctx, head_dim], of which
    positions 0..n-1 are filled.  Allocated whole but zeroed by the system on first touch
    (``rows.lazy_zeros``), so it costs memory only for the positions a row
    really holds, and it never has to grow (no copies of the cache as a row gets longer)."""

    __slots__ = ("k", "v", "n")

    def __init__(self, k, v, n):
        self.k, self.v, self.n = k, v, n

    @classmethod
    def empty(cls, hp: HParams, n: int = 0) -> "_RowCache":
        shape = (hp.n_layer, hp.n_head, hp.n_ctx, hp.head_dim)
        return cls(lazy_zeros(shape), lazy_zeros(shape), n)

    def copy(self) -> "_RowCache":
        other = _RowCache(lazy_zeros(self.k.shape), lazy_zeros(self.v.shape), self.n)
        other.k[:, :, : self.n] = self.k[:, :, : self.n]  # only what is filled: untouched pages stay free
        other.v[:, :, : self.n] = self.v[:, :, : self.n]
        return other


class NumpyDecoder(RowDecoder):
    """Sequences decoded together with numpy (the row table and interface of ``model.rows``).

    Every sequence has its own key/value cache [n_layer, n_head, capacity, head_dim] (grown by
    doubling up to n_ctx), so a row that leaves, is cut or restarts touches no other row.
    ``NumpyDecoder.from_model(m)`` decodes over a CPU model's own weight buffers (no copy).
    """

    engine = "numpy"

    @classmethod
    def from_model(cls, model) -> "NumpyDecoder":
        """A decoder over ``model``'s weights (numpy views of a CPU model's tensors, no copy)."""
        return cls(model.hparams, cpu_weights(model))

    def __init__(self, hparams: HParams, weights: dict):
        super().__init__(hparams)
        self.wte = weights["model/wte"]
        self.wpe = weights["model/wpe"]
        self.layers = [layer_weights(weights, i) for i in range(hparams.n_layer)]  # by name: "ln_1/g", ...
        self.ln_f_g, self.ln_f_b = weights["model/ln_f/g"], weights["model/ln_f/b"]
        self.scale = np.float32(1.0 / math.sqrt(hparams.head_dim))
        self._caches: List[Optional[_RowCache]] = []  # by slot
        # BLAS threads (model.threads): the block products of a step of up to ROWS_AS_VECTORS rows
        # (matrix-vector products, whose results do not depend on the count) run with a count
        # tuned by timing; everything else -- prefills, steps of more rows, the output projection
        # -- with one thread: on some CPUs (OpenBLAS's Haswell kernels on an AMD EPYC, measured)
        # a matrix product's last bits depend on how many threads split it, and tokens must never
        # depend on --threads or the load.  (This is the reference engine: --engine auto decodes
        # with ONNX Runtime, whose results are the same for any thread count.)
        self.threads = fixed_threads() or cpu_count()
        self._tuner = StepTuner(self.threads) if fixed_threads() is None and self.threads > 1 else None

    # -- the engine's side of the row table ---------------------------------------------------

    def _reserve(self, slots: int, positions: int) -> None:
        if len(self._caches) < slots:
            self._caches += [None] * (slots - len(self._caches))

    def _copy(self, src: int, dst: int) -> None:
        self._caches[dst] = self._caches[src].copy()

    def _move(self, src: int, dst: int) -> None:
        self._caches[dst], self._caches[src] = self._caches[src], None

    def _cleared(self) -> None:
        self._caches = []

    def _save(self, slot: int):
        row, self._caches[slot] = self._caches[slot], None  # the row's own cache object: nothing copied
        return row

    def _load(self, slot: int, state) -> None:
        self._caches[slot] = state

    def _prefill(self, slot: int, ids) -> np.ndarray:
        """Slot ``slot`` holds a new row of ``ids``; the logits [n_vocab] after its last token."""
        hp = self.hparams
        set_blas_threads(1)
        ids = np.asarray(ids, dtype=np.int64)
        T = ids.shape[0]
        row = _RowCache.empty(hp, T)
        x = self.wte[ids] + self.wpe[:T]
        attend = _prefill_attention(row, hp.n_head, hp.head_dim, self.scale)
        for i, p in enumerate(self.layers):
            _block(x, p, attend, i, qkv_product=np.matmul)
        self._caches[slot] = row
        return self._logits(x[-1:])[0]

    def _logits(self, x):
        # The output projection's last bits depend on OpenBLAS's thread count, as matrix-vector
        # products and (on some CPUs) as a matrix product: one thread, so that tokens never
        # depend on --threads or the load.
        set_blas_threads(1)
        return _mm(_layer_norm(x, self.ln_f_g, self.ln_f_b), self.wte.T)

    def _step(self, slots, tokens, positions) -> np.ndarray:
        hp = self.hparams
        chosen = [self._caches[s] for s in slots]
        for row, p in zip(chosen, positions):
            row.n = int(p)  # the row's length before this token
        B = len(chosen)
        x = self.wte[tokens] + self.wpe[positions]
        attend = _step_attention(chosen, hp.n_head, hp.head_dim, self.scale)
        tuned = self._tuner is not None and B <= ROWS_AS_VECTORS
        if tuned:
            self._tuner.before(B)
            t0 = time.perf_counter()
        else:
            set_blas_threads(1)
        for i, p in enumerate(self.layers):
            _block(x, p, attend, i)
        for row in chosen:
            row.n += 1
        if tuned:
            self._tuner.after(B, time.perf_counter() - t0)
        return self._logits(x)
