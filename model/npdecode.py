"""Token-by-token decoding on the CPU with numpy over the model's weights.

Decoding one token is a chain of matrix-vector products over every weight:
memory-bound work in which TensorFlow's per-op overhead and its
matrix-vector kernels cost more than the arithmetic (measured on the
reference machine: a TF graph step runs at about 0.55 of the bandwidth
bound, this engine at about 0.9).  It computes the same GPT-2 step with
numpy over the very same weight buffers (numpy views of the model's CPU
tensors, no copy) and a key/value cache that grows with the sequence.
"""
from __future__ import annotations

import math

import numpy as np

from .hparams import LAYER_NORM_EPSILON, HParams

_GELU_C = np.float32(math.sqrt(2.0 / math.pi))
_EPS = np.float32(LAYER_NORM_EPSILON)
_LAYER_KEYS = ("ln_1/g", "ln_1/b", "attn/c_attn/w", "attn/c_attn/b", "attn/c_proj/w", "attn/c_proj/b",
               "ln_2/g", "ln_2/b", "mlp/c_fc/w", "mlp/c_fc/b", "mlp/c_proj/w", "mlp/c_proj/b")


def _layer_norm(x, g, b):
    """Layer norm of x [..., E] (x is overwritten)."""
    x -= x.mean(axis=-1, keepdims=True)
    var = np.einsum("...i,...i->...", x, x)[..., None]
    var /= np.float32(x.shape[-1])
    var += _EPS
    x /= np.sqrt(var)
    x *= g
    x += b
    return x


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


def _finish_block(x, a, wp, bp, g2, b2, wf, bf, wm, bm):
    """The rest of a block after attention: x += proj(a); x += mlp(ln_2(x)), in place."""
    o = a @ wp
    o += bp
    x += o
    h = _layer_norm(x.copy(), g2, b2) @ wf
    h += bf
    o = _gelu(h) @ wm
    o += bm
    x += o


def cpu_weights(model) -> dict:
    """Numpy views (no copies) of a CPU model's weights, conv1d as [in, out]."""
    return {name: np.asarray(var.value() if hasattr(var, "value") else var)
            for name, var in model.variables.items()}


class NumpyDecoder:
    """A batch of sequences decoded together, all at the same position.

    ``start(ids)`` prefills [B, T] prompts of equal length and returns the
    logits after them; ``step(ids)`` appends one token per row and returns
    its logits [B, n_vocab]; ``rewind(n)`` forgets every position from n on;
    ``keep(rows)`` drops the other rows (finished samples).
    """

    def __init__(self, hparams: HParams, weights: dict):
        self.hparams = hparams
        self.wte = weights["model/wte"]
        self.wpe = weights["model/wpe"]
        self.layers = [tuple(weights[f"model/h{i}/{k}"] for k in _LAYER_KEYS) for i in range(hparams.n_layer)]
        self.ln_f = (weights["model/ln_f/g"], weights["model/ln_f/b"])
        self.scale = np.float32(1.0 / math.sqrt(hparams.head_dim))
        self.k = self.v = None
        self.length = 0

    # -- cache management -----------------------------------------------------

    def _reserve(self, batch: int, needed: int) -> None:
        hp = self.hparams
        capacity = 0 if self.k is None else self.k.shape[3]
        if self.k is not None and self.k.shape[1] == batch and capacity >= needed:
            return
        size = min(hp.n_ctx, max(needed, 2 * capacity, 64))
        shape = (hp.n_layer, batch, hp.n_head, size, hp.head_dim)
        k, v = np.empty(shape, np.float32), np.empty(shape, np.float32)
        if self.k is not None and self.k.shape[1] == batch and self.length:
            k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
            v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        self.k, self.v = k, v

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length} from {self.length}")
        self.length = length

    def keep(self, rows) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self.k = np.ascontiguousarray(self.k[:, rows])
        self.v = np.ascontiguousarray(self.v[:, rows])

    # -- the network ----------------------------------------------------------------

    def _logits(self, x):
        return _layer_norm(x, *self.ln_f) @ self.wte.T

    def start(self, ids) -> np.ndarray:
        """Prefill with ids [B, T] (equal lengths); logits [B, n_vocab] after the last token."""
        hp = self.hparams
        ids = np.asarray(ids, dtype=np.int64)
        B, T = ids.shape
        if T > hp.n_ctx:
            raise ValueError(f"{T} tokens do not fit the context of {hp.n_ctx}")
        H, D = hp.n_head, hp.head_dim
        self.k = None
        self.length = 0
        self._reserve(B, T + 1)
        x = (self.wte[ids] + self.wpe[:T]).reshape(B * T, hp.n_embd)
        causal = np.triu(np.full((T, T), -1e10, np.float32), 1)
        for i, (g1, b1, wa, ba, wp, bp, g2, b2, wf, bf, wm, bm) in enumerate(self.layers):
            qkv = _layer_norm(x.copy(), g1, b1) @ wa
            qkv += ba
            qkv = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            self.k[i, :, :, :T] = k
            self.v[i, :, :, :T] = v
            w = q @ k.transpose(0, 1, 3, 2)
            w *= self.scale
            w += causal
            _softmax_(w)
            a = (w @ v).transpose(0, 2, 1, 3).reshape(B * T, hp.n_embd)
            _finish_block(x, a, wp, bp, g2, b2, wf, bf, wm, bm)
        self.length = T
        return self._logits(x.reshape(B, T, hp.n_embd)[:, -1].copy())

    def step(self, ids) -> np.ndarray:
        """One token per row at position ``length``; logits [B, n_vocab]."""
        hp = self.hparams
        H, D = hp.n_head, hp.head_dim
        pos = self.length
        if pos >= hp.n_ctx:
            raise ValueError(f"the context of {hp.n_ctx} tokens is full")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        B = ids.shape[0]
        self._reserve(B, pos + 1)
        x = self.wte[ids] + self.wpe[pos]
        n = pos + 1
        for i, (g1, b1, wa, ba, wp, bp, g2, b2, wf, bf, wm, bm) in enumerate(self.layers):
            qkv = _layer_norm(x.copy(), g1, b1) @ wa
            qkv += ba
            qkv = qkv.reshape(B, 3, H, D)
            kc, vc = self.k[i], self.v[i]
            kc[:, :, pos] = qkv[:, 1]
            vc[:, :, pos] = qkv[:, 2]
            w = np.matmul(kc[:, :, :n], qkv[:, 0, :, :, None])[..., 0]  # [B, H, n]
            w *= self.scale
            _softmax_(w)
            a = np.matmul(w[:, :, None, :], vc[:, :, :n]).reshape(B, hp.n_embd)
            _finish_block(x, a, wp, bp, g2, b2, wf, bf, wm, bm)
        self.length = n
        return self._logits(x)
