"""The GPT-2 forward pass in TensorFlow 2: full sequences and a key/value cache.

    import model
    m = model.load("models/gpt2ja-small")          # -> Model
    logits = m.logits([[10, 20, 30]])               # [1, 3, n_vocab] float32
    h = m.hidden([[10, 20, 30]])                    # [1, 3, n_embd], after ln_f
    cache, last = m.start([[10, 20, 30]], max_len=64)   # prefill: last [1, n_vocab]
    nxt = m.step(cache, [int(last[0].argmax())])        # one token: [1, n_vocab]
    # inside a task's own tf.function (scoring, training):
    h = m.graph_hidden(ids)                         # [B, T, n_embd] tensor, after ln_f
    logits = m.graph_logits(h)                      # [B, T, n_vocab]: the tied projection
    b = m.with_precision("bf16")                    # bfloat16 block matrices (or model.load(dir, precision="bf16"))

Standard GPT-2 (pre-norm blocks, layer norm eps 1e-5, tanh gelu, causal
attention masked as ``w*b - 1e10*(1-b)``, output projection tied to ``wte``),
float32 throughout.  With ``precision="bf16"`` the four weight matrices of
each block are held as bfloat16 (half the memory) and multiplied in bfloat16
(oneDNN accumulates in float32; on a CPU with AMX the products run about
3 times faster); the embeddings, biases, layer norms, attention,
softmax, residual stream and the output projection stay float32, and every
result is float32.  Weights live once, as tf.Variables on the chosen
device; every computation is a ``tf.function`` traced with unknown batch and
length dimensions, so new lengths or batch sizes never retrace.  The block
is written once (``_block``); the full forward pass, the prefill and the
decoding step differ only in the attention they pass it.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Dict, Optional, Tuple

import numpy as np

from . import PRECISIONS
from ._tf import import_tf
from .batch import as_batch
from .checkpoint import _tf_message, open_checkpoint, read_errors
from .device import CPU
from .errors import ModelError
from .hparams import LAYER_NORM_EPSILON, HParams, check_vocab, layer_weights, variable_shapes
from .threads import naming_tensorflow_threads

tf = import_tf()

#: From this many cached tokens on, decoding attention uses batched matmuls.
_LONG_SPAN = 256
_IDS_2D = tf.TensorSpec([None, None], tf.int32)
_IDS_1D = tf.TensorSpec([None], tf.int32)
#: The dtype of the block matrices (the checkpoint's ``.../w`` variables) for each precision.
_MATRIX_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16}


def _check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def bf16_native(device: str = CPU) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware: a GPU, or a CPU whose flags
    (Linux's /proc/cpuinfo) include AMX (amx_bf16) or AVX512_BF16, with TensorFlow's
    oneDNN kernels on (not ``TF_ENABLE_ONEDNN_OPTS=0``).  Elsewhere TensorFlow
    emulates bfloat16 products, which is slower than float32."""
    if "GPU" in str(device).upper():
        return True
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("0", "false"):
        return False  # Eigen's bfloat16 products: no faster than float32 (measured)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    found = set(line.split(":", 1)[1].split())
                    return bool(found & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


# --------------------------------------------------------------------------- building blocks

def _layer_norm(x, g, b):
    u = tf.reduce_mean(x, axis=-1, keepdims=True)
    d = x - u
    s = tf.reduce_mean(tf.square(d), axis=-1, keepdims=True)
    return d * tf.math.rsqrt(s + LAYER_NORM_EPSILON) * g + b


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu(x):
    return 0.5 * x * (1.0 + tf.tanh(_GELU_C * (x + 0.044715 * (x * x * x))))


#: Query positions whose attention scores a forward pass (``Model.hidden``, ``logits``) over a batch
#: longer than twice this computes at a time: the scores of 4 rows of 1,024 tokens are [4, H, 1024, 1024]
#: floats (256 MiB per layer at medium's 16 heads) all at once, an eighth of that in parts of 128 -- the
#: same numbers, bit for bit (each position's softmax is its own row), a lower peak of memory (medium,
#: 4 x 1,024 tokens: 2,602 -> 2,406 MB) at the same speed (small, medium) or faster (the tiny test
#: model, 57 -> 40-45 ms).  Such batches have a function of their own, built on first use (0.4 s more
#: than the other for small, 0.65 s for medium: its loop): shorter batches, and the graphs of scoring
#: and training, keep the one product.  None: never in parts.
QUERIES = 128


def _softmax(x):
    """Softmax over the last axis, written out as the original GPT-2 graph does.

    (Also cheaper than tf.nn.softmax's oneDNN kernel for the tiny score rows of
    a decoding step.)
    """
    e = tf.exp(x - tf.reduce_max(x, axis=-1, keepdims=True))
    return e / tf.reduce_sum(e, axis=-1, keepdims=True)


def _mask_scores(w, keep):
    """``w*b - 1e10*(1-b)`` with b = keep (0/1 floats), as the original graph."""
    return w * keep - 1e10 * (1.0 - keep)


def _matmul(x, w):
    """x [N, in] (float32) times a block matrix w [in, out]: a float32 w is one plain
    MatMul (the float32 graph); a bfloat16 w multiplies x rounded to bfloat16 (oneDNN
    accumulates in float32) and returns the product as float32.  A weight with a
    ``weight_product`` method (``model.lora``: an adapter, a bfloat16 cast while
    training) computes the product itself."""
    if hasattr(w, "weight_product"):
        return w.weight_product(x)
    if w.dtype == tf.float32:
        return tf.matmul(x, w)
    return tf.cast(tf.matmul(tf.cast(x, w.dtype), w), tf.float32)


def _mlp(x, p):
    h = _gelu(_matmul(x, p["mlp/c_fc/w"]) + p["mlp/c_fc/b"])
    return _matmul(h, p["mlp/c_proj/w"]) + p["mlp/c_proj/b"]


# --------------------------------------------------------------------------- the cache
#
# The cache variables are only ever touched by sparse ops: written with
# scatter_nd_update (in place) and read with a batched ResourceGather of the
# slots in use.  A dense read (ReadVariableOp, slicing a variable) after a
# scatter would copy the whole variable, and a strided-slice assignment copies
# it too: at n_ctx 1024 that is 75 MB per decoding step for the small model.

def _cache_index(batch, n_head, slots):
    """Scatter indices [B, H, len(slots), 3] addressing (row, head, slot)."""
    b, h, t = tf.meshgrid(tf.range(batch), tf.range(n_head), slots, indexing="ij")
    return tf.stack([b, h, t], axis=-1)


def _read_slots(var, upto):
    """var[:, :, :S, :] for upto = broadcast range(S) [B, H, S], without copying the variable."""
    return tf.raw_ops.ResourceGather(resource=var.handle, indices=upto, dtype=tf.float32, batch_dims=2)


class Cache:
    """Key/value cache of one batch of sequences for incremental decoding.

    Made by ``Model.start``; advanced by ``Model.step``.  Per layer it holds
    preallocated keys and values ``[batch, n_head, max_len, head_dim]`` (tf
    Variables on the model's device, written in place).  Rows are stored
    left-aligned to a common slot counter: a prompt shorter than the longest
    one is preceded by ``offsets[b]`` masked padding slots, so every step
    writes the same slot for all rows and positions are ``slot - offsets``.
    ``lengths`` is each row's real length so far (prompt + generated tokens).
    A cache belongs to the model that made it.
    """

    def __init__(self, keys, values, offsets: np.ndarray, offsets_t, slot: int, max_len: int):
        self.keys = keys
        self.values = values
        self.offsets = offsets
        self._offsets_t = offsets_t
        self.slot = slot
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens so far in each row (its prompt plus the steps taken)."""
        return self.slot - self.offsets

    @property
    def room(self) -> int:
        """How many more steps fit in the cache."""
        return self.max_len - self.slot


# --------------------------------------------------------------------------- the block

def _block(x, p, attend, cache=None):
    """One transformer block on the tokens x [N, E]; returns the new x.

    The one block of the full forward pass, the prefill and the decoding
    step.  ``p``: the block's weights by name (``hparams.LAYER_NAMES``).
    ``attend(qkv, cache)``: the attention of the N tokens given their
    projections qkv [N, 3E] -> [N, E] (``_sequence_attention`` or
    ``_step_attention``); ``cache``: this block's (keys, values) cache
    variables, where it stores the tokens' keys and values (and reads the
    earlier ones), or None.
    """
    a = _layer_norm(x, p["ln_1/g"], p["ln_1/b"])
    qkv = _matmul(a, p["attn/c_attn/w"]) + p["attn/c_attn/b"]
    a = attend(qkv, cache)
    x = x + _matmul(a, p["attn/c_proj/w"]) + p["attn/c_proj/b"]
    return x + _mlp(_layer_norm(x, p["ln_2/g"], p["ln_2/b"]), p)


def _sequence_attention(hp: HParams, batch, length, keep=None, where=None, queries: Optional[int] = None):
    """``attend`` for whole sequences x [B*T, E] (forward pass, prefill).

    ``keep``: attention mask broadcastable to [B, H, T, T] (1 = attend);
    default causal.  With a cache, the keys and values [B, H, T, D] are
    written to its slots ``where`` (``_cache_index``).  ``queries``: the scores
    are computed for that many query positions at a time (one after another)
    rather than all T at once: the same numbers per position, [B, H, queries, T]
    of scores alive at a time instead of [B, H, T, T].
    """
    H, D = hp.n_head, hp.head_dim
    scale = 1.0 / math.sqrt(D)
    if keep is None:
        keep = tf.linalg.band_part(tf.ones([length, length], tf.float32), -1, 0)

    def scores(q, k, v, rows_keep):
        w = tf.matmul(q, k, transpose_b=True) * scale
        w = _softmax(_mask_scores(w, rows_keep))
        return tf.matmul(w, v)  # [B, H, rows, D]

    def attend(qkv, cache):
        qkv = tf.transpose(tf.reshape(qkv, [batch, length, 3, H, D]), [2, 0, 3, 1, 4])
        q, k, v = qkv[0], qkv[1], qkv[2]
        if cache is not None:
            keys, values = cache
            keys.scatter_nd_update(where, k)
            values.scatter_nd_update(where, v)
        if queries is None:
            a = tf.transpose(scores(q, k, v, keep), [0, 2, 1, 3])  # [B, T, H, D]
        else:
            def part(i, out):
                lo = i * queries
                hi = tf.minimum(lo + queries, length)
                a_i = scores(q[:, :, lo:hi], k, v, keep[..., lo:hi, :])
                return i + 1, out.write(i, tf.transpose(a_i, [2, 0, 1, 3]))  # [rows, B, H, D]

            parts = (length + queries - 1) // queries
            _, out = tf.while_loop(lambda i, _: i < parts, part,
                                   (tf.constant(0), tf.TensorArray(tf.float32, size=parts, infer_shape=False)),
                                   parallel_iterations=1)
            a = tf.transpose(out.concat(), [1, 0, 2, 3])  # [B, T, H, D]
        return tf.reshape(a, [batch * length, hp.n_embd])

    return attend


def _step_attention(hp: HParams, batch, span, keep, where, long_span: bool):
    """``attend`` for one token per row, x [B, E], at cache slot span-1, over the slots 0..span-1.

    The token's key and value are written to the slots ``where`` [B, H, 1, 3];
    the cache is read with a sparse gather of the slots in use (see
    ``_read_slots``).  ``keep`` [B, 1, S]: 1 for a row's real slots.  The
    scores are computed with elementwise multiply-and-sum for short spans (a
    few cheap Eigen ops; batched matmuls of a 1-row query cost more in fixed
    overhead than they save) and with batched matmuls for long spans
    (``long_span``).
    """
    H, D = hp.n_head, hp.head_dim
    scale = 1.0 / math.sqrt(D)
    upto = tf.broadcast_to(tf.range(span), [batch, H, span])  # slots 0..span-1 of every row and head

    def attend(qkv, cache):
        keys, values = cache
        q, k, v = tf.split(qkv, 3, axis=1)
        keys.scatter_nd_update(where, tf.reshape(k, [batch, H, 1, D]))
        values.scatter_nd_update(where, tf.reshape(v, [batch, H, 1, D]))
        q = tf.reshape(q, [batch, H, 1, D])
        ks, vs = _read_slots(keys, upto), _read_slots(values, upto)  # [B, H, S, D]
        if long_span:
            w = tf.matmul(q, ks, transpose_b=True)[:, :, 0, :] * scale
        else:
            w = tf.reduce_sum(q * ks, axis=-1) * scale  # [B, H, S]
        w = _softmax(_mask_scores(w, keep))
        if long_span:
            a = tf.matmul(w[:, :, None, :], vs)
        else:
            a = tf.reduce_sum(w[:, :, :, None] * vs, axis=2)  # [B, H, D]
        return tf.reshape(a, [batch, hp.n_embd])

    return attend


# --------------------------------------------------------------------------- the model

class Model:
    """A GPT-2 with its weights as tf.Variables on one device.

    Attributes: ``hparams`` (HParams), ``device`` (e.g. '/CPU:0'), ``path``
    (the checkpoint prefix it was loaded from, or None), ``variables``
    (checkpoint name -> tf.Variable; conv1d weights stored as [in, out]),
    ``precision`` ('fp32', or 'bf16': the block matrices are bfloat16 variables,
    see ``with_precision``).

    Batches are lists of id lists or 2-D integer arrays.  Lists of unequal
    lengths are right-padded; positions past a row's length are returned as
    zeros.  Because attention is causal, padding after a row's real tokens never
    changes the numbers at its real positions, so right-padded batches give
    exactly the per-row results.
    """

    def __init__(self, hparams: HParams, variables: Dict[str, "tf.Variable"], device: str = CPU,
                 path: Optional[str] = None):
        self.hparams = hparams
        self.device = device
        self.path = path
        self.variables = variables
        self.precision = _precision_of(variables, hparams)
        self._wte = variables["model/wte"]
        self._wpe = variables["model/wpe"]
        self._layers = [layer_weights(variables, i) for i in range(hparams.n_layer)]  # by name: "ln_1/g", ...
        self._ln_f_g, self._ln_f_b = variables["model/ln_f/g"], variables["model/ln_f/b"]
        self._forward_fns: Dict[Tuple[str, int], object] = {}
        self._prefill_fn = tf.function(self._prefill_graph, reduce_retracing=True)
        self._decode_fns = {
            long: tf.function(functools.partial(self._decode_graph, long_span=long), reduce_retracing=True)
            for long in (False, True)}
        self._traced = set()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_weights(cls, weights, hparams: Optional[HParams] = None, device: str = CPU,
                     path: Optional[str] = None, precision: str = "fp32") -> "Model":
        """A Model from a mapping of checkpoint names to arrays/tensors (e.g. ``random_weights``)."""
        _check_precision(precision)
        from .checkpoint import check_shapes, infer_hparams
        shapes = {k: tuple(int(d) for d in v.shape) for k, v in weights.items()}
        if hparams is None:
            hparams = infer_hparams(shapes, "weights")
        check_shapes(hparams, shapes, source="weights")
        variables = {}
        with tf.device(device):
            for name in variable_shapes(hparams):
                variables[name] = _make_variable(name, weights[name], precision)
        return cls(hparams, variables, device=device, path=path)

    def with_precision(self, precision: str) -> "Model":
        """This model with its block matrices in ``precision`` ('fp32' or 'bf16').

        The same precision gives this model itself.  'bf16' of a float32 model
        gives a new Model whose block matrices (``.../attn/c_attn/w``,
        ``attn/c_proj/w``, ``mlp/c_fc/w``, ``mlp/c_proj/w``: nearly all the
        weights besides the embeddings) are bfloat16 copies, cast once; every
        other variable is shared.  Drop the float32 model to free its matrices
        (``model.load(dir, precision="bf16")`` never holds them all).  Its
        ``hidden``, ``logits``, ``graph_hidden``, ``start``/``step`` multiply by
        those matrices in bfloat16 and return float32 (see the module's
        docstring).  A bfloat16 model has lost the float32 values: asking it for
        'fp32' is a ModelError, as are ``checkpoint_tensors``/``model.save``.
        """
        _check_precision(precision)
        if precision == self.precision:
            return self
        if self.precision != "fp32":
            raise ModelError(f"a model with {self.precision} weights cannot give {precision} results: "
                             f"load it with precision='{precision}'")
        variables = {}
        with tf.device(self.device):
            for name, var in self.variables.items():
                variables[name] = _make_variable(name, var, precision, stored=True) if name.endswith("/w") else var
        return Model(self.hparams, variables, device=self.device, path=self.path)

    def checkpoint_tensors(self) -> Dict[str, "tf.Tensor"]:
        """The weights in checkpoint layout (conv1d weights [1, in, out]), without copying.

        Float32 models only: a bf16 model's matrices are rounded (ModelError)."""
        if self.precision != "fp32":
            raise ModelError(f"a model with {self.precision} weights has lost the checkpoint's float32 values: "
                             f"save or convert the float32 model")
        out = {}
        for name, var in self.variables.items():
            value = var.read_value() if hasattr(var, "read_value") else var
            if name.endswith("/w"):
                value = tf.expand_dims(value, 0)
            out[name] = value
        return out

    def tracing_count(self) -> int:
        """How many times this model's compiled functions were traced so far.

        Every forward, prefill and decoding function is traced with unknown
        batch and length dimensions, so new batch sizes or lengths must not
        raise this number (a retrace costs seconds) -- but once: a forward pass
        over a batch longer than 2 x ``QUERIES`` has a function of its own."""
        fns = [*self._forward_fns.values(), self._prefill_fn, *self._decode_fns.values()]
        return sum(fn.experimental_get_tracing_count() for fn in fns)

    def check_vocab_size(self, n: int) -> None:
        """Raise ModelError unless a vocabulary of ``n`` entries matches n_vocab."""
        check_vocab(self.hparams, n)

    def __repr__(self) -> str:
        hp = self.hparams
        extra = "" if self.precision == "fp32" else f", precision={self.precision!r}"
        return (f"Model(n_layer={hp.n_layer}, n_embd={hp.n_embd}, n_head={hp.n_head}, n_ctx={hp.n_ctx}, "
                f"n_vocab={hp.n_vocab}, device={self.device!r}, path={self.path!r}{extra})")

    # ---------------------------------------------------------------- full sequences

    def _embed(self, ids, positions):
        # Gather from the variables' dense values: a sparse read (ResourceGather) would put
        # the variable in copy-on-read mode and every later read of wte would copy 60+ MB.
        return tf.gather(self._wte.value(), ids) + tf.gather(self._wpe.value(), positions)

    def _final_norm(self, x):
        return _layer_norm(x, self._ln_f_g, self._ln_f_b)

    def _forward_graph(self, ids, n_blocks: int, final_norm: bool, logits: bool, queries: Optional[int] = None):
        batch, length = tf.shape(ids)[0], tf.shape(ids)[1]
        x = tf.reshape(self._embed(ids, tf.range(length)), [batch * length, self.hparams.n_embd])
        attend = _sequence_attention(self.hparams, batch, length, queries=queries)
        for p in self._layers[:n_blocks]:
            x = _block(x, p, attend)
        if final_norm:
            x = self._final_norm(x)
        if logits:
            x = self.graph_logits(x)
        return tf.reshape(x, [batch, length, -1])

    # ---------------------------------------------------------------- inside the caller's tf.function

    def graph_hidden(self, ids):
        """Final layer-normed hidden states [B, T, n_embd] (what ``hidden`` returns) as a tf tensor.

        For building a task's own ``tf.function`` (scoring, training):
        ``ids`` is an int32 tensor [B, T] of valid token ids (nothing is
        checked, see ``model.as_batch``), T at most n_ctx.  Attention is causal,
        so right padding never changes the earlier positions.  Gradients flow
        to ``variables``.
        """
        return self._forward_graph(ids, self.hparams.n_layer, final_norm=True, logits=False)

    def graph_logits(self, hidden):
        """The output projection (tied to ``wte``) of hidden states [..., n_embd]: logits [..., n_vocab].

        ``graph_logits(graph_hidden(ids))`` are ``logits(ids)``; projecting
        only the positions needed (e.g. gathered [N, n_embd]) saves the rest.
        """
        if hidden.shape.rank == 2:
            return tf.matmul(hidden, self._wte, transpose_b=True)
        flat = tf.reshape(hidden, [-1, self.hparams.n_embd])
        out = tf.matmul(flat, self._wte, transpose_b=True)
        return tf.reshape(out, tf.concat([tf.shape(hidden)[:-1], [self.hparams.n_vocab]], axis=0))

    def build_forward_passes(self) -> None:
        """Build the forward passes of ``hidden`` and ``logits`` now, for short batches and for those
        long enough to compute attention in parts (``QUERIES``), so that no later first call pays for
        it (a server does this before it takes requests)."""
        lengths = [2]
        if QUERIES is not None and 2 * QUERIES + 1 <= self.hparams.n_ctx:
            lengths.append(2 * QUERIES + 1)
        for n in lengths:
            self.hidden([[0] * n])
            self.logits([[0] * n])

    def _forward(self, kind: str, n_blocks: int, ids, lengths) -> np.ndarray:
        arr, lens = as_batch(ids, self.hparams, lengths)
        queries = QUERIES if QUERIES is not None and arr.shape[1] > 2 * QUERIES else None
        key = (kind, n_blocks, queries)
        fn = self._forward_fns.get(key)
        if fn is None:
            final = kind != "residual"
            graph = lambda x: self._forward_graph(x, n_blocks, final, kind == "logits", queries)  # noqa: E731
            fn = self._forward_fns[key] = tf.function(graph, input_signature=[_IDS_2D])
        with tf.device(self.device):
            out = fn(tf.constant(arr)).numpy()
        if (lens < arr.shape[1]).any():
            out[np.arange(arr.shape[1])[None, :] >= lens[:, None]] = 0.0
        return out

    def logits(self, ids, lengths=None) -> np.ndarray:
        """Next-token logits at every position: float32 [batch, T, n_vocab].

        ``ids``: list of id lists (unequal lengths are right-padded) or a 2-D
        int array; ``lengths`` optionally gives each row's real length in a
        padded array.  Rows are independent: a batch gives its rows' numbers.
        """
        return self._forward("logits", self.hparams.n_layer, ids, lengths)

    def hidden(self, ids, layer: int = -1, lengths=None) -> np.ndarray:
        """Hidden states, float32 [batch, T, n_embd]; never computes logits.

        ``layer=-1`` (default): the final layer-normed states (after ``ln_f``,
        what the original's ``h_flat`` holds).  ``layer=N`` (0-based): the
        residual stream right after block N, without ``ln_f`` (blocks after N
        are not run).
        """
        n_layer = self.hparams.n_layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -1 <= layer < n_layer:
            raise ModelError(f"layer must be -1 (final output) or 0..{n_layer - 1}, got {layer!r}")
        layer = int(layer)
        if layer == -1:
            return self._forward("hidden", n_layer, ids, lengths)
        return self._forward("residual", layer + 1, ids, lengths)

    # ---------------------------------------------------------------- incremental decoding

    def _prefill_graph(self, ids, offsets, keys, values):
        """ids [B, T] left-padded by offsets [B]; fills cache slots 0..T-1, returns logits at slot T-1."""
        hp = self.hparams
        batch, length = tf.shape(ids)[0], tf.shape(ids)[1]
        slots = tf.range(length)
        positions = tf.maximum(slots[None, :] - offsets[:, None], 0)
        x = tf.reshape(self._embed(ids, positions), [batch * length, hp.n_embd])
        causal = slots[None, :, None] >= slots[None, None, :]                       # [1, T, T]
        real = slots[None, None, :] >= offsets[:, None, None]                      # [B, 1, T]
        keep = tf.cast(tf.logical_and(causal, real), tf.float32)[:, None, :, :]    # [B, 1, T, T]
        attend = _sequence_attention(hp, batch, length, keep, where=_cache_index(batch, hp.n_head, slots))
        for p, kc, vc in zip(self._layers, keys, values):
            x = _block(x, p, attend, (kc, vc))
        h = tf.reshape(x, [batch, length, hp.n_embd])[:, -1, :]
        return self.graph_logits(self._final_norm(h))

    def _decode_graph(self, ids, slot, offsets, keys, values, long_span: bool = False):
        """ids [B] at cache slot ``slot`` (scalar); returns their logits [B, V].

        ``long_span``: attention over the slots 0..slot with batched matmuls
        (from _LONG_SPAN cached tokens on) instead of elementwise products
        (see ``_step_attention``).
        """
        hp = self.hparams
        batch = tf.shape(ids)[0]
        x = self._embed(ids, slot - offsets)  # [B, E]
        span = slot + 1
        keep = tf.cast(tf.range(span)[None, None, :] >= offsets[:, None, None], tf.float32)  # [B, 1, S]
        where = _cache_index(batch, hp.n_head, slot[None])  # [B, H, 1, 3]: this token's slot
        attend = _step_attention(hp, batch, span, keep, where, long_span)
        for p, kc, vc in zip(self._layers, keys, values):
            x = _block(x, p, attend, (kc, vc))
        return self.graph_logits(self._final_norm(x))

    def _new_cache(self, batch: int, max_len: int, offsets: np.ndarray, slot: int) -> Cache:
        hp = self.hparams
        shape = [batch, hp.n_head, max_len, hp.head_dim]
        loose = tf.TensorShape([None, hp.n_head, None, hp.head_dim])  # one trace for every batch/length
        with tf.device(self.device):
            keys = [tf.Variable(tf.zeros(shape, tf.float32), shape=loose, trainable=False)
                    for _ in range(hp.n_layer)]
            values = [tf.Variable(tf.zeros(shape, tf.float32), shape=loose, trainable=False)
                      for _ in range(hp.n_layer)]
            offsets_t = tf.constant(offsets.astype(np.int32))
        return Cache(keys, values, offsets.astype(np.int64), offsets_t, slot, max_len)

    def _cache_fn(self, kind, cache: Cache):
        """The compiled prefill (kind 'prefill') or decode step (kind False/True: long span).

        Each is traced once, on first use, with unknown batch size, length and
        cache size, so that no later call retraces.
        """
        fn = self._prefill_fn if kind == "prefill" else self._decode_fns[kind]
        if kind not in self._traced:
            with tf.device(self.device):
                if kind == "prefill":
                    fn.get_concrete_function(_IDS_2D, _IDS_1D, cache.keys, cache.values)
                else:
                    fn.get_concrete_function(_IDS_1D, tf.TensorSpec([], tf.int32), _IDS_1D, cache.keys, cache.values)
            self._traced.add(kind)
        return fn

    def start(self, ids, lengths=None, max_len: Optional[int] = None) -> Tuple[Cache, np.ndarray]:
        """Prefill a cache with a batch of prompts: returns (cache, logits_last [batch, n_vocab]).

        ``ids``: list of id lists (unequal lengths are right-padded) or a 2-D
        array with optional ``lengths``.  ``logits_last[b]`` are the logits
        after row b's last real token.  ``max_len`` (default n_ctx) is the
        cache size: the longest prompt plus every step must fit in it;
        a smaller one saves memory and time (the cache is
        2 * n_layer * batch * max_len * n_embd floats).
        """
        hp = self.hparams
        arr, lens = as_batch(ids, hp, lengths)
        max_len = hp.n_ctx if max_len is None else int(max_len)
        if not arr.shape[1] <= max_len <= hp.n_ctx:
            raise ModelError(f"max_len must be between the prompt length {arr.shape[1]} and n_ctx {hp.n_ctx}, "
                             f"got {max_len}")
        width = arr.shape[1]
        offsets = (width - lens).astype(np.int64)
        if offsets.any():  # right-padded -> left-padded: every row ends at slot width-1
            left = np.zeros_like(arr)
            for b, (n, off) in enumerate(zip(lens, offsets)):
                left[b, off:] = arr[b, :n]
            arr = left
        cache = self._new_cache(arr.shape[0], max_len, offsets, width)
        with tf.device(self.device):
            out = self._cache_fn("prefill", cache)(tf.constant(arr), cache._offsets_t, cache.keys, cache.values)
        return cache, out.numpy()

    def step(self, cache: Cache, next_ids) -> np.ndarray:
        """Append one token per row to the cache; returns its logits [batch, n_vocab].

        ``next_ids``: one id per row (sequence of ints or an int array of shape
        [batch] or [batch, 1]).  The compiled step is shared by every batch
        size and length.  Raises ModelError when the cache is full.
        """
        ids = np.asarray(next_ids).reshape(-1)
        if ids.shape[0] != cache.batch_size:
            raise ModelError(f"{ids.shape[0]} next ids for a cache of {cache.batch_size} rows")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ModelError(f"token ids must be integers, got {ids.dtype}")
        if ((ids < 0) | (ids >= self.hparams.n_vocab)).any():
            raise ModelError(f"token id outside the vocabulary (0..{self.hparams.n_vocab - 1})")
        if cache.room <= 0:
            raise ModelError(f"the cache is full ({cache.max_len} tokens); start with a larger max_len")
        with tf.device(self.device):
            decode = self._cache_fn(cache.slot >= _LONG_SPAN, cache)
            out = decode(tf.constant(ids.astype(np.int32)), tf.constant(cache.slot, tf.int32),
                         cache._offsets_t, cache.keys, cache.values)
        cache.slot += 1
        return out.numpy()


# --------------------------------------------------------------------------- loading

def _make_variable(name: str, value, precision: str = "fp32", stored: bool = False) -> "tf.Variable":
    """A trainable variable; conv1d weights [1, in, out] are stored as [in, out] (``stored``: value
    is already [in, out]).  Float32, except the block matrices (``.../w``) with precision 'bf16'."""
    if name.endswith("/w") and not stored:
        value = value[0]
    value = tf.convert_to_tensor(value, tf.float32)
    if name.endswith("/w") and precision != "fp32":
        value = tf.cast(value, _MATRIX_DTYPES[precision])  # round to nearest even
    return tf.Variable(value, name=name.replace("/", "_"), trainable=True)


def _precision_of(variables, hparams: HParams) -> str:
    """'fp32' or 'bf16': the dtype of the block matrices, which must all have the same one."""
    found = {variables[f"model/h{i}/{leaf}"].dtype for i in range(hparams.n_layer)
             for leaf in ("attn/c_attn/w", "attn/c_proj/w", "mlp/c_fc/w", "mlp/c_proj/w")}
    for precision, dtype in _MATRIX_DTYPES.items():
        if found == {dtype}:
            return precision
    raise ModelError(f"block matrices of dtype {', '.join(sorted(d.name for d in found))}: "
                     f"expected all float32 or all bfloat16")


def load(model_dir: str | os.PathLike, device: Optional[str] = None, precision: str = "fp32",
         lora: Optional[str | os.PathLike] = None) -> Model:
    """Load a model directory (checkpoint + optional hparams.json) into a Model.

    The checkpoint is found as ``find_checkpoint`` says; hparams come from
    ``hparams.json`` or the variables' shapes; every variable is checked, then
    read one at a time into a tf.Variable on ``device`` (default: CPU, or the
    result of ``select_device``), so at most one extra variable is in memory
    besides the weights.  Every failure is a one-line ModelError.

    ``precision="bf16"``: the block matrices are rounded to bfloat16 as they
    are read (see ``Model.with_precision``), so the float32 weights are never all
    in memory.

    ``lora``: a LoRA adapter (an ``adapter-N.npz``, or a run directory of
    ``gpt2-finetune.py --lora``) made for this checkpoint, merged into the
    float32 weights as they are read (``model.lora``); an adapter made for
    another base is a ModelError.

    A released name (``gpt2ja-small``, ...) is resolved to a directory above
    this layer: ``hub.load(name)`` (or ``model.load(hub.resolve_model(name))``).
    """
    _check_precision(precision)
    with naming_tensorflow_threads():  # (TensorFlow's pools start here the first time)
        return _load(model_dir, device or CPU, precision, lora)


def _load(model_dir, device: str, precision: str, lora) -> Model:
    reader, hp = open_checkpoint(model_dir)
    deltas = {}
    if lora is not None:
        from .lora import merge_deltas
        deltas = merge_deltas(reader.prefix, hp, lora)
    variables = {}
    try:
        with tf.device(device):
            for name in variable_shapes(hp):
                value = reader.get(name)
                if name in deltas:
                    value = value + deltas.pop(name)[None]
                variables[name] = _make_variable(name, value, precision)
                del value
    except ModelError:
        raise
    except read_errors() as e:
        raise ModelError(f"cannot load {reader.prefix}: {_tf_message(e)}") from None
    m = Model(hp, variables, device=device, path=reader.prefix)
    if lora is not None:
        m.lora = str(lora)
    return m
