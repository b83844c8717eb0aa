"""Token-by-token decoding with ONNX Runtime: float32, or 8-/4-bit weights (``MatMulNBits``).

    import model
    dec = model.decoder(m, quantize="q4")        # OnnxDecoder; or engine="onnx" for float32
    logits = dec.add([[1, 2, 3], [4, 5]])
    logits = dec.step([42, 7])

One ONNX graph computes a whole decoding step -- every block (layer norms,
the weight products, biases, FastGelu, the attention) and the logits -- in
one ``run`` for all rows; the same graph with S tokens per row and an empty
cache prefills a new row.  Weight products are ``MatMul`` (float32, over
the model's own weight buffers, no copy) or ``com.microsoft`` ``MatMulNBits``
(block 32, ``accuracy_level`` 4: int8 arithmetic on the activations) over
weights quantized by ``model.quantize`` (made once per checkpoint and cached).

Python keeps the key/value caches and the rows' bookkeeping, as
``NumpyDecoder`` does (same interface, ``model.decoding.Decoder``): rows of
any lengths decode together, join and leave at any step, rewind and restart
on their own.  The caches are two numpy arrays [n_layer, slots, n_head,
capacity, head_dim]; layer i's slice of the rows in use is handed to the
graph as an input without a copy (IOBinding over the numpy buffer), and an
additive mask [slots, 1, 1, capacity] (0 below a row's length, -1e9 from it
on) gives every row attention over exactly its own length.  The graph
returns the new token's keys and values; Python writes them at each row's
position.  Rows occupy slots 0..rows-1 in any order (a row that leaves is
replaced by the last slot's row: one row's cache is copied, not the batch).
Numbers are those of float32 GPT-2 up to float rounding (the float32 graph
matches ``NumpyDecoder`` to about 1e-5) or of the quantized weights.

Threads: ONNX Runtime uses as many intra-op threads as this process may run
on (``os.sched_getaffinity``), one inter-op thread, and its threads do not
spin while waiting (on a shared machine spinning threads collapse under load).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence

import numpy as np

from .errors import ModelError
from .hparams import LAYER_NORM_EPSILON, HParams
from .npdecode import cpu_weights
from .quantize import BLOCK

MS = "com.microsoft"
#: MatMulNBits' accuracy_level: 4 = int8 arithmetic on the (per-block quantized) activations.
ACCURACY_LEVEL = 4
_MIN_CAPACITY = 64
_MASKED = np.float32(-1e9)


def _import_ort():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ModelError(f"the onnx engine (--quantize, --engine onnx) needs onnxruntime and onnx: "
                         f"pip install onnxruntime onnx ({e})") from None
    return onnxruntime


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def session_options(threads: Optional[int] = None):
    """ONNX Runtime session options: ``threads`` intra-op threads (default ``cpu_count()``), one
    inter-op thread, no spinning, every graph optimization."""
    ort = _import_ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or cpu_count()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class _GraphBuilder:
    """Nodes and initializers of one graph; large initializers are handed to ONNX Runtime as
    OrtValues over numpy buffers (no copy into the model proto)."""

    def __init__(self):
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes = []
        self.inits = []
        self.external = {}  # name -> numpy array (kept alive by the session's owner)
        self._n = 0

    def const(self, name: str, arr) -> str:
        import onnx
        arr = np.asarray(arr)
        if arr.size > 1024:
            arr = np.ascontiguousarray(arr)
            t = onnx.TensorProto()
            t.name = name
            t.data_type = self.helper.np_dtype_to_tensor_dtype(arr.dtype)
            t.dims.extend(arr.shape)
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", "in_memory"), ("offset", "0"), ("length", str(arr.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self.inits.append(t)
            self.external[name] = arr
        else:
            self.inits.append(self.numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs, outputs=None, domain: str = "", **attrs):
        if outputs is None:
            self._n += 1
            outputs = [f"t{self._n}"]
        elif isinstance(outputs, str):
            outputs = [outputs]
        self.nodes.append(self.helper.make_node(op, list(inputs), list(outputs), domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


def build_step_graph(hp: HParams, weights: dict, quantized: Optional[dict] = None):
    """The ONNX model of one decoding step (or a prefill) and its external initializers.

    Inputs: ``x`` [B, S, E] (embeddings of S new tokens per row), ``mask`` [B, 1, 1, T] (additive,
    over the T cached positions), ``causal`` [S, S] (additive, among the new tokens), ``split``
    int64 [T, S], and per layer ``pk{i}``/``pv{i}`` [B, H, T, D] (the cache).  Outputs: ``logits``
    [B, V] after the last new token, ``new_k``/``new_v`` [L, B, H, S, D].
    ``quantized``: arrays of ``model.quantize`` (``name/q``, ``name/s``; 8 or 4 bits, matrix by matrix);
    None: float32.
    """
    from onnx import TensorProto, helper

    g = _GraphBuilder()
    E, H, D, L, V = hp.n_embd, hp.n_head, hp.head_dim, hp.n_layer, hp.n_vocab
    scale = 1.0 / math.sqrt(D)
    eps = float(LAYER_NORM_EPSILON)
    shape_qkv = g.const("shape_qkv", np.array([0, 0, 3 * H, D], np.int64))
    shape_e3 = g.const("shape_e3", np.array([0, 0, E], np.int64))
    shape_e2 = g.const("shape_e2", np.array([-1, E], np.int64))
    heads3 = g.const("heads3", np.array([H, H, H], np.int64))
    last_start = g.const("last_start", np.array([-1], np.int64))
    last_end = g.const("last_end", np.array([1 << 62], np.int64))
    axis1 = g.const("axis1", np.array([1], np.int64))
    axis0 = g.const("axis0", np.array([0], np.int64))

    def matmul(x, name, k, n):
        """x @ W for W [k, n] (checkpoint layout [in, out])."""
        if quantized is None:
            return g.node("MatMul", [x, g.const(name, weights[f"model/{name}"])])
        return nbits(x, name, k, n)

    def nbits(x, name, k, n, out=None):
        """MatMulNBits over quantized[name/q] [n, blocks, blob]: its bits follow from the blob size."""
        q = quantized[name + "/q"]
        return g.node("MatMulNBits", [x, g.const(name + "/q", q), g.const(name + "/s", quantized[name + "/s"])],
                      out, domain=MS, K=k, N=n, bits=q.shape[2] * 8 // BLOCK, block_size=BLOCK,
                      accuracy_level=ACCURACY_LEVEL)

    def layer_norm(x, prefix):
        return g.node("LayerNormalization", [x, g.const(prefix + "/g", weights[prefix + "/g"]),
                                             g.const(prefix + "/b", weights[prefix + "/b"])], axis=-1, epsilon=eps)

    x = "x"
    new_k, new_v = [], []
    for i in range(L):
        p = f"model/h{i}/"
        h = f"h{i}/"
        qkv = g.node("Add", [matmul(layer_norm(x, p + "ln_1"), h + "attn/c_attn/w", E, 3 * E),
                             g.const(p + "attn/c_attn/b", weights[p + "attn/c_attn/b"])])
        qkv = g.node("Transpose", [g.node("Reshape", [qkv, shape_qkv])], perm=[0, 2, 1, 3])  # [B, 3H, S, D]
        q, k, v = g.node("Split", [qkv, heads3], [f"q{i}", f"k{i}", f"v{i}"], axis=1)
        new_k.append(g.node("Unsqueeze", [k, axis0]))
        new_v.append(g.node("Unsqueeze", [v, axis0]))
        cached = g.node("Add", [g.node("FusedMatMul", [q, f"pk{i}"], domain=MS, transB=1, alpha=scale), "mask"])
        fresh = g.node("Add", [g.node("FusedMatMul", [q, k], domain=MS, transB=1, alpha=scale), "causal"])
        probs = g.node("Softmax", [g.node("Concat", [cached, fresh], axis=-1)], axis=-1)
        p_cached, p_fresh = g.node("Split", [probs, "split"], [f"pc{i}", f"pf{i}"], axis=-1)
        a = g.node("Add", [g.node("MatMul", [p_cached, f"pv{i}"]), g.node("MatMul", [p_fresh, v])])  # [B,H,S,D]
        a = g.node("Reshape", [g.node("Transpose", [a], perm=[0, 2, 1, 3]), shape_e3])  # [B, S, E]
        o = g.node("Add", [matmul(a, h + "attn/c_proj/w", E, E), g.const(p + "attn/c_proj/b", weights[p + "attn/c_proj/b"])])
        x = g.node("Add", [x, o])
        f = g.node("FastGelu", [matmul(layer_norm(x, p + "ln_2"), h + "mlp/c_fc/w", E, 4 * E),
                                g.const(p + "mlp/c_fc/b", weights[p + "mlp/c_fc/b"])], domain=MS)
        o = g.node("Add", [matmul(f, h + "mlp/c_proj/w", 4 * E, E), g.const(p + "mlp/c_proj/b", weights[p + "mlp/c_proj/b"])])
        x = g.node("Add", [x, o])
    last = g.node("Reshape", [g.node("Slice", [x, last_start, last_end, axis1]), shape_e2])  # [B, E]
    last = layer_norm(last, "model/ln_f")
    if quantized is None:
        g.node("Gemm", [last, g.const("wte", weights["model/wte"])], "logits", transB=1)
    else:
        nbits(last, "wte", E, V, "logits")
    g.node("Concat", new_k, "new_k", axis=0)
    g.node("Concat", new_v, "new_v", axis=0)

    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f32, ["B", "S", E]),
              helper.make_tensor_value_info("mask", f32, ["B", 1, 1, "T"]),
              helper.make_tensor_value_info("causal", f32, ["S", "S"]),
              helper.make_tensor_value_info("split", TensorProto.INT64, [2])]
    for i in range(L):
        inputs += [helper.make_tensor_value_info(f"pk{i}", f32, ["B", H, "T", D]),
                   helper.make_tensor_value_info(f"pv{i}", f32, ["B", H, "T", D])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["B", V]),
               helper.make_tensor_value_info("new_k", f32, [L, "B", H, "S", D]),
               helper.make_tensor_value_info("new_v", f32, [L, "B", H, "S", D])]
    graph = helper.make_graph(g.nodes, "gpt2_step", inputs, outputs, initializer=g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    onnx_model.ir_version = 9
    return onnx_model, g.external


def _capacity(needed: int, n_ctx: int) -> int:
    size = _MIN_CAPACITY
    while size < needed:
        size *= 2
    return min(size, n_ctx)


class OnnxDecoder:
    """A batch of sequences decoded together with ONNX Runtime (the ``model.decoding.Decoder``
    interface, as ``NumpyDecoder``): ``add``, ``step``, ``reset``, ``feed``, ``truncate``, ``keep``,
    ``lengths``, ``rows``, ``clear``; ``start``/``rewind``/``length`` for equal rows.

    ``OnnxDecoder.from_model(m, quantize=None|"q8"|"q4")``.  ``quantize``: the weight format;
    ``quantized_path``: the cache file the quantized weights came from or went to (None for
    float32 or when no cache could be written); ``quantized_now``: True when they were made by
    this decoder (False: read from the cache).
    """

    engine = "onnx"
    joins_running = True

    @classmethod
    def from_model(cls, model, quantize: Optional[str] = None, cache_root=None,
                   threads: Optional[int] = None) -> "OnnxDecoder":
        weights = cpu_weights(model)
        quantized = None
        if quantize is not None:
            from . import quantize as q
            quantized = q.load_or_make(weights, getattr(model, "path", None), quantize, model.hparams, cache_root)
        return cls(model.hparams, weights, quantized, threads=threads)

    def __init__(self, hparams: HParams, weights: dict, quantized=None, threads: Optional[int] = None):
        """``weights``: float32 arrays by checkpoint name (conv1d as [in, out]); ``quantized``: a
        ``model.quantize.Quantized`` (None: float32 weight products)."""
        ort = _import_ort()
        self._ort = ort
        self.hparams = hp = hparams
        self.quantize = None if quantized is None else quantized.fmt
        self.quantized_path = None if quantized is None else quantized.path
        self.quantized_now = bool(quantized is not None and quantized.made)
        self.wte = weights["model/wte"]
        self.wpe = weights["model/wpe"]
        onnx_model, external = build_step_graph(hp, weights, None if quantized is None else quantized.arrays)
        so = session_options(threads)
        self._external = external  # the buffers must outlive the session
        if external:
            so.add_external_initializers(list(external),
                                         [ort.OrtValue.ortvalue_from_numpy(a) for a in external.values()])
        self.session = ort.InferenceSession(onnx_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        H, D = hp.n_head, hp.head_dim
        self._empty_cache = np.zeros((1, H, 1, D), np.float32)
        self._empty_mask = np.full((1, 1, 1, 1), _MASKED, np.float32)
        self._K: Optional[np.ndarray] = None  # [L, slots, H, capacity, D]
        self._V: Optional[np.ndarray] = None
        self._mask: Optional[np.ndarray] = None  # [slots, 1, 1, capacity]
        self._n = np.zeros(0, np.int64)  # length per slot
        self._slots: List[int] = []  # row -> slot; the slots in use are 0..rows-1
        self._binding = None
        self._binding_key = None
        self.prefilled_tokens = 0

    # -- rows -------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self._slots)

    def lengths(self) -> List[int]:
        return [int(self._n[s]) for s in self._slots]

    @property
    def length(self) -> int:
        return max(self.lengths(), default=0)

    def clear(self) -> None:
        self._slots = []
        self._K = self._V = self._mask = None
        self._n = np.zeros(0, np.int64)
        self._binding = self._binding_key = None

    def truncate(self, rows, length: int) -> None:
        for r in rows:
            n = int(self._n[self._slots[int(r)]])
            if not 0 <= length <= n:
                raise ValueError(f"cannot rewind row {r} to {length} from {n}")
        for r in rows:
            s = self._slots[int(r)]
            self._n[s] = length
            self._mask[s, :, :, length:] = _MASKED

    def rewind(self, length: int) -> None:
        self.truncate(range(self.rows), length)

    def keep(self, rows) -> None:
        slots = [self._slots[int(r)] for r in rows]
        if len(set(slots)) != len(slots):
            raise ValueError("keep: a row may be kept once only")
        count = len(slots)
        holes = sorted(set(range(count)) - set(slots))
        for j, s in enumerate(slots):
            if s >= count:  # move this row into a free slot below count
                hole = holes.pop()
                n = int(self._n[s])
                self._K[:, hole, :, :n] = self._K[:, s, :, :n]
                self._V[:, hole, :, :n] = self._V[:, s, :, :n]
                self._mask[hole] = self._mask[s]
                self._n[hole] = n
                slots[j] = hole
        self._slots = slots

    def _reserve(self, slots: int, positions: int) -> None:
        """Room for ``slots`` rows of ``positions`` positions each (grown by doubling)."""
        hp = self.hparams
        if self._K is not None and self._K.shape[1] >= slots and self._K.shape[3] >= positions:
            return
        old_slots, old_cap = (0, 0) if self._K is None else (self._K.shape[1], self._K.shape[3])
        new_slots = max(slots, old_slots, 1)
        if new_slots > old_slots and old_slots:
            new_slots = max(new_slots, min(2 * old_slots, new_slots + 8))
        cap = max(old_cap, _capacity(positions, hp.n_ctx))
        shape = (hp.n_layer, new_slots, hp.n_head, cap, hp.head_dim)
        # zeros (not empty): masked positions are still multiplied, and must be finite
        K, V = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        mask = np.full((new_slots, 1, 1, cap), _MASKED, np.float32)
        if self._K is not None:
            K[:, :old_slots, :, :old_cap] = self._K
            V[:, :old_slots, :, :old_cap] = self._V
            mask[:old_slots, :, :, :old_cap] = self._mask
        n = np.zeros(new_slots, np.int64)
        n[: len(self._n)] = self._n
        self._K, self._V, self._mask, self._n = K, V, mask, n
        self._binding = self._binding_key = None

    # -- prefill ----------------------------------------------------------------------

    def _prefill(self, ids):
        """(keys, values [L, H, T, D], logits [n_vocab]) of a new row holding ``ids``."""
        hp = self.hparams
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T = ids.shape[0]
        if T == 0:
            raise ValueError("a row needs at least one token")
        if T > hp.n_ctx:
            raise ValueError(f"{T} tokens do not fit the context of {hp.n_ctx}")
        if ids.min() < 0 or ids.max() >= hp.n_vocab:
            raise ValueError(f"token ids must be in [0, {hp.n_vocab})")
        self.prefilled_tokens += T
        feeds = {"x": (self.wte[ids] + self.wpe[:T])[None], "mask": self._empty_mask,
                 "causal": np.triu(np.full((T, T), _MASKED, np.float32), 1),
                 "split": np.array([1, T], np.int64)}
        for i in range(hp.n_layer):
            feeds[f"pk{i}"] = feeds[f"pv{i}"] = self._empty_cache
        logits, k, v = self.session.run(["logits", "new_k", "new_v"], feeds)
        return k[:, 0], v[:, 0], logits[0]

    def _place(self, slot: int, k, v) -> None:
        T = k.shape[2]
        self._K[:, slot, :, :T] = k
        self._V[:, slot, :, :T] = v
        self._mask[slot] = _MASKED
        self._mask[slot, :, :, :T] = 0.0
        self._n[slot] = T

    def add(self, seqs) -> np.ndarray:
        """Append rows holding ``seqs``; logits [len(seqs), n_vocab] after each."""
        seqs = [tuple(int(t) for t in np.asarray(s).reshape(-1)) for s in seqs]
        logits = np.empty((len(seqs), self.hparams.n_vocab), np.float32)
        done = {}
        for b, seq in enumerate(seqs):
            if seq not in done:
                done[seq] = self._prefill(seq)
            k, v, last = done[seq]
            slot = len(self._slots)
            if b == 0:  # room for all the new rows at once
                self._reserve(slot + len(seqs), max(len(s) for s in seqs) + 1)
            self._place(slot, k, v)
            self._slots.append(slot)
            logits[b] = last
        return logits

    def reset(self, rows, seqs) -> np.ndarray:
        """Replace each of ``rows`` by a row holding the matching sequence."""
        rows = [int(r) for r in rows]
        if len(rows) != len(seqs):
            raise ValueError("one sequence per row")
        logits = np.empty((len(rows), self.hparams.n_vocab), np.float32)
        for j, (r, seq) in enumerate(zip(rows, seqs)):
            k, v, logits[j] = self._prefill(seq)
            self._reserve(self.rows, k.shape[2] + 1)
            self._place(self._slots[r], k, v)
        return logits

    def feed(self, tokens, stepping, restarting, windows) -> np.ndarray:
        """Rows ``stepping`` take one token each (``tokens``), rows ``restarting`` restart
        from their ``windows``; the logits that follow, for every row [rows, n_vocab]."""
        if not restarting:
            return self.step(tokens, rows=stepping)
        logits = np.empty((self.rows, self.hparams.n_vocab), np.float32)
        if stepping:
            logits[stepping] = self.step(tokens, rows=stepping)
        logits[restarting] = self.reset(restarting, windows)
        return logits

    def start(self, ids) -> np.ndarray:
        """Forget every row, then prefill the rows of ids [B, T]."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"ids must be [batch, length], got shape {ids.shape}")
        self.clear()
        return self.add(list(ids))

    # -- one step ---------------------------------------------------------------------

    def _bind(self, B: int):
        """The IOBinding of a step over slots 0..B-1 (inputs and outputs are numpy buffers)."""
        key = (B, id(self._K))
        if self._binding_key == key:
            return self._binding
        hp, ort = self.hparams, self._ort
        L, H, D, cap = hp.n_layer, hp.n_head, hp.head_dim, self._K.shape[3]
        self._x = np.zeros((B, 1, hp.n_embd), np.float32)
        self._logits = np.empty((B, hp.n_vocab), np.float32)
        self._new_k = np.empty((L, B, H, 1, D), np.float32)
        self._new_v = np.empty((L, B, H, 1, D), np.float32)
        ov = ort.OrtValue.ortvalue_from_numpy
        arrays = {"x": self._x, "mask": self._mask[:B], "causal": np.zeros((1, 1), np.float32),
                  "split": np.array([cap, 1], np.int64)}
        for i in range(L):
            arrays[f"pk{i}"] = self._K[i, :B]
            arrays[f"pv{i}"] = self._V[i, :B]
        io = self.session.io_binding()
        values = []
        for name, a in arrays.items():
            value = ov(a)  # shares the numpy buffer (contiguous: leading-axis slices)
            values.append((value, a))
            io.bind_ortvalue_input(name, value)
        for name, a in (("logits", self._logits), ("new_k", self._new_k), ("new_v", self._new_v)):
            value = ov(a)
            values.append((value, a))
            io.bind_ortvalue_output(name, value)
        self._bound_values = values
        self._binding, self._binding_key = io, key
        return io

    def step(self, tokens, rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """One token for each of ``rows`` (default all, in order); logits [len(rows), n_vocab]."""
        hp = self.hparams
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        chosen = list(range(self.rows)) if rows is None else [int(r) for r in rows]
        b = len(chosen)
        if tokens.shape[0] != b:
            raise ValueError(f"{tokens.shape[0]} tokens for {b} rows")
        if b == 0:
            return np.empty((0, hp.n_vocab), np.float32)
        if tokens.min() < 0 or tokens.max() >= hp.n_vocab:
            raise ValueError(f"token ids must be in [0, {hp.n_vocab})")
        slots = np.array([self._slots[r] for r in chosen], np.int64)
        pos = self._n[slots]
        if pos.max() >= hp.n_ctx:
            raise ValueError(f"the context of {hp.n_ctx} tokens is full")
        B = self.rows  # every slot in use runs; rows not stepping are computed and ignored
        self._reserve(B, int(pos.max()) + 1)
        io = self._bind(B)
        all_tok = np.zeros(B, np.int64)
        all_pos = np.minimum(self._n[:B], hp.n_ctx - 1)
        all_tok[slots] = tokens
        np.add(self.wte[all_tok], self.wpe[all_pos], out=self._x[:, 0])
        self.session.run_with_iobinding(io)
        # the new keys/values at each stepping row's position
        # (K[:, slots, :, pos] is [b, L, H, D]: the advanced indices' axis comes first)
        self._K[:, slots, :, pos, :] = self._new_k[:, :, :, 0][:, slots].transpose(1, 0, 2, 3)
        self._V[:, slots, :, pos, :] = self._new_v[:, :, :, 0][:, slots].transpose(1, 0, 2, 3)
        self._mask[slots, 0, 0, pos] = 0.0
        self._n[slots] += 1
        return self._logits[slots]
