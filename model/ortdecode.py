"""Token-by-token decoding with ONNX Runtime: float32, or 8-/4-bit weights (``MatMulNBits``).

    import model
    dec = model.decoder(m, quantize="q4")        # OnnxDecoder; or engine="onnx" for float32
    logits = dec.add([0, 1], [[1, 2, 3], [4, 5]])
    logits = dec.step([0, 1], [42, 7])

One ONNX graph computes a whole decoding step -- every block and the
logits -- in one ``run`` for all rows, in about 7 nodes a block (fused
``com.microsoft`` ops: ``SkipLayerNormalization``, ``GroupQueryAttention``,
``FastGelu`` with its bias); the same graph with S tokens in one row
prefills it.  Weight products are ``MatMul`` (float32, over the model's own
weight buffers, no copy) or ``MatMulNBits`` (block 32, ``accuracy_level`` 4:
int8 arithmetic on the activations, the bias inside) over weights quantized
by ``model.quantize`` (made once per checkpoint and cached; the input
embedding is then a float16 table).  Quantized weights are read by ONNX
Runtime from the cache file itself (external data at each array's offset in
it), so that each matrix is let go once ``MatMulNBits`` has packed it: the
weights are in memory once, in the packed layout.

The row table (``model.rows``, shared with every engine) keeps the sequences'
bookkeeping: rows of any lengths decode together, join and leave at any step,
are cut and restart on their own.  The key/value caches are
two numpy arrays [n_layer, slots, n_head, capacity, head_dim]; layer i's slice
of the rows in use is bound (IOBinding, no copy) both as the attention's past
and as its present, so ``GroupQueryAttention`` writes each row's new keys and
values in place at that row's length (``seqlens``) and attends over exactly
that row's positions.  Rows occupy slots 0..rows-1 in any order (a row that
leaves is replaced by the last slot's row: one row's cache is copied, not the
batch).  Numbers are those of float32 GPT-2 up to float rounding (the float32
graph matches ``NumpyDecoder`` to about 1e-5) or of the quantized weights.

Threads: ONNX Runtime uses the count ``--threads`` fixed, else as many
intra-op threads as this process may run on (``os.sched_getaffinity``), one
inter-op thread, and its threads do not spin while waiting (on a shared
machine spinning threads collapse under load).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .errors import ModelError
from .hparams import LAYER_NORM_EPSILON, HParams
from .npdecode import cpu_weights
from .quantize import BLOCK
from .rows import Parked, RowDecoder, lazy_zeros
from .threads import cpu_count, fixed_threads

MS = "com.microsoft"
#: MatMulNBits' accuracy_level: 4 = int8 arithmetic on the (per-block quantized) activations.
ACCURACY_LEVEL = 4


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise _missing(e) from None
    return onnxruntime


def _missing(e: ImportError) -> ModelError:
    return ModelError(f"the onnx engine (--quantize, --engine onnx) needs onnxruntime and onnx: "
                      f"pip install onnxruntime onnx ({e})")


def session_options(threads: Optional[int] = None, prepack: bool = True):
    """ONNX Runtime session options: ``threads`` intra-op threads (default: the count --threads fixed
    (``model.configure_threads``), else ``cpu_count()``), one
    inter-op thread, no spinning, every graph optimization; ``prepack`` False keeps MLAS from
    packing a second copy of the float32 weights (less memory, slower products)."""
    ort = _import_ort()
    so = ort.SessionOptions()
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.intra_op_num_threads = threads or fixed_threads() or cpu_count()
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

    def __init__(self, stored=None):
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes = []
        self.inits = []
        self.external = {}  # name -> numpy array (kept alive by the session's owner)
        self.stored = stored  # (file name, {name: (offset, length)}): weights read from that file
        self._n = 0

    def const(self, name: str, arr, weight: bool = True) -> str:
        """An initializer: a weight (``weight``, named as in the weights it was taken from) is
        read by ONNX Runtime from the file ``stored`` names when it is there, else handed over
        at session creation, so the graph itself holds no model's numbers (and can be kept and
        reused, see ``graph_for``); anything else is written into the graph."""
        import onnx
        arr = np.asarray(arr)
        if weight:
            arr = np.ascontiguousarray(arr)
            t = onnx.TensorProto()
            t.name = name
            t.data_type = self.helper.np_dtype_to_tensor_dtype(arr.dtype)
            t.dims.extend(arr.shape)
            t.data_location = onnx.TensorProto.EXTERNAL
            if self.stored is not None and name in self.stored[1]:
                offset, length = self.stored[1][name]
                where = (("location", self.stored[0]), ("offset", str(offset)), ("length", str(length)))
            else:
                where = (("location", "in_memory"), ("offset", "0"), ("length", str(arr.nbytes)))
                self.external[name] = arr
            for k, v in where:
                e = t.external_data.add()
                e.key, e.value = k, v
            self.inits.append(t)
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


def build_step_graph(hp: HParams, weights: dict, quantized: Optional[dict] = None, stored=None):
    """The ONNX model of one decoding step (or a prefill) and its external initializers.

    Inputs: ``x`` [B, S, E] (embeddings of S new tokens per row), ``seqlens`` int32 [B] (each
    row's cached length; its new tokens go at that position), ``total`` int32 scalar (the longest
    row's length after this run), and per layer ``pk{i}``/``pv{i}`` [B, H, capacity, D] (the
    cache).  Outputs: ``logits`` [B, V] after the last new token, and per layer ``ck{i}``/``cv{i}``:
    the same cache with the new tokens' keys and values written in (bound to the inputs' buffers,
    so written in place).

    Per block: ``MatMulNBits`` (or ``MatMul``) with its bias for the attention's projection;
    ``GroupQueryAttention`` (as many key/value heads as heads: plain multi-head attention over each
    row's own length, causal among new tokens); the output projection; ``SkipLayerNormalization``
    adds the residual and the projection's bias and normalizes for the MLP in one node; the MLP's
    first product with ``FastGelu`` (bias inside); its second product, whose residual and bias the
    next block's (or the final) ``SkipLayerNormalization`` adds.  About 7 nodes a block.
    ``quantized``: arrays of ``model.quantize`` (``name/q``, ``name/s``; 8 or 4 bits, matrix by
    matrix); None: float32.  ``stored``: (file name, {weight name: (offset, length)}): the weights
    ONNX Runtime reads from that file (in the folder named at session creation) rather than takes
    from memory.
    """
    from onnx import TensorProto, helper

    g = _GraphBuilder(stored)
    E, H, D, L, V = hp.n_embd, hp.n_head, hp.head_dim, hp.n_layer, hp.n_vocab
    eps = float(LAYER_NORM_EPSILON)
    shape_e2 = g.const("shape_e2", np.array([-1, E], np.int64), weight=False)
    last_start = g.const("last_start", np.array([-1], np.int64), weight=False)
    last_end = g.const("last_end", np.array([1 << 62], np.int64), weight=False)
    axis1 = g.const("axis1", np.array([1], np.int64), weight=False)

    def w(name):
        return g.const(name, weights[name])

    def matmul(x, name, k, n, bias=None):
        """x @ W (+ bias) for W [k, n] (checkpoint layout [in, out])."""
        if quantized is None:
            y = g.node("MatMul", [x, w(f"model/{name}")])
            return y if bias is None else g.node("Add", [y, w(bias)])
        q = quantized[name + "/q"]  # [n, blocks, blob]: the bits follow from the blob size
        inputs = [x, g.const(name + "/q", q), g.const(name + "/s", quantized[name + "/s"])]
        if bias is not None:
            inputs += ["", "", w(bias)]  # no zero points, no g_idx
        return g.node("MatMulNBits", inputs, domain=MS, K=k, N=n, bits=q.shape[2] * 8 // BLOCK,
                      block_size=BLOCK, accuracy_level=ACCURACY_LEVEL)

    def skip_norm(x, skip, ln, bias, i):
        """(layer_norm(x + skip + bias), x + skip + bias)."""
        outs = g.node("SkipLayerNormalization", [x, skip, w(ln + "/g"), w(ln + "/b"), w(bias)],
                      [f"{ln}/normed", "", "", f"{ln}/sum"], domain=MS, epsilon=eps)
        return outs[0], outs[3]

    x = "x"
    normed = g.node("LayerNormalization", [x, w("model/h0/ln_1/g"), w("model/h0/ln_1/b")], axis=-1, epsilon=eps)
    for i in range(L):
        p = f"model/h{i}/"
        h = f"h{i}/"
        qkv = matmul(normed, h + "attn/c_attn/w", E, 3 * E, p + "attn/c_attn/b")
        a = g.node("GroupQueryAttention", [qkv, "", "", f"pk{i}", f"pv{i}", "seqlens", "total"],
                   [f"a{i}", f"ck{i}", f"cv{i}"], domain=MS, num_heads=H, kv_num_heads=H,
                   scale=1.0 / math.sqrt(D))[0]
        o = matmul(a, h + "attn/c_proj/w", E, E)
        normed, x = skip_norm(x, o, p + "ln_2", p + "attn/c_proj/b", i)
        f = g.node("FastGelu", [matmul(normed, h + "mlp/c_fc/w", E, 4 * E), w(p + "mlp/c_fc/b")], domain=MS)
        o = matmul(f, h + "mlp/c_proj/w", 4 * E, E)
        following = f"model/h{i + 1}/ln_1" if i + 1 < L else "model/ln_f"
        normed, x = skip_norm(x, o, following, p + "mlp/c_proj/b", i)
    last = g.node("Reshape", [g.node("Slice", [normed, last_start, last_end, axis1]), shape_e2])  # [B, E]
    if quantized is None:
        g.node("Gemm", [last, w("model/wte")], "logits", transB=1)
    else:
        matmul(last, "wte", E, V)
        g.nodes[-1].output[0] = "logits"

    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [helper.make_tensor_value_info("x", f32, ["B", "S", E]),
              helper.make_tensor_value_info("seqlens", i32, ["B"]),
              helper.make_tensor_value_info("total", i32, [])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["B", V])]
    for i in range(L):
        inputs += [helper.make_tensor_value_info(f"p{kv}{i}", f32, ["B", H, "T", D]) for kv in "kv"]
        outputs += [helper.make_tensor_value_info(f"c{kv}{i}", f32, ["B", H, "T", D]) for kv in "kv"]
    graph = helper.make_graph(g.nodes, "gpt2_step", inputs, outputs, initializer=g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    onnx_model.ir_version = 9
    return onnx_model, g.external


#: The first line of a kept graph file.
_GRAPH_MAGIC = b"gpt2-japanese onnx step graph 1\n"
#: The largest kept graph read (they are tens of kB: every weight is outside the graph).
_MAX_GRAPH = 1 << 24


def _graph_key(hp: HParams, weights: dict, quantized: bool, stored=None) -> str:
    """What a step graph depends on: the hparams, whether the products are quantized, every weight
    array's name, shape and dtype, the file the weights are read from and where each lies in it
    (``stored``), and this module's source (a change to how graphs are built makes a new key).
    Not the weights' values: they are read or handed over at session creation."""
    import hashlib
    import json

    h = hashlib.sha256()
    with open(__file__, "rb") as f:
        h.update(f.read())
    desc = {"hparams": hp.to_dict(), "quantized": quantized, "block": BLOCK, "accuracy": ACCURACY_LEVEL,
            "weights": sorted([k, list(np.shape(a)), np.asarray(a).dtype.str] for k, a in weights.items())}
    if stored is not None:
        desc["stored"] = [stored[0], sorted([k, list(v)] for k, v in stored[1].items())]
    h.update(json.dumps(desc, sort_keys=True).encode())
    return h.hexdigest()


def _graph_path(key: str):
    from .quantize import SUBDIR, default_cache_root

    return default_cache_root() / SUBDIR / "graphs" / f"step-{key[:32]}.onnx"


def _read_graph(path):
    """(graph bytes, weight names) of a kept graph file, or None when it is missing, not a regular
    file (never through a symbolic link), or fails its own checksum."""
    import hashlib
    import json

    from util.files import read_small

    raw = read_small(path, _MAX_GRAPH)
    if raw is None or not raw.startswith(_GRAPH_MAGIC):
        return None
    try:
        digest, names, graph = raw[len(_GRAPH_MAGIC):].split(b"\n", 2)
        if hashlib.sha256(names + b"\n" + graph).hexdigest().encode() != digest:
            return None
        return graph, json.loads(names.decode())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def graph_for(hp: HParams, weights: dict, quantized: Optional[dict] = None, stored=None):
    """(serialized step graph, the names of the weights it takes from memory) for
    ``build_step_graph``'s arguments: kept once built under the model cache
    (``quantize.default_cache_root()/quantized/graphs``), so that later starts neither build it nor
    import ``onnx`` (about 0.4 s).  A kept file is used only when its checksum holds; one that
    cannot be written is not an error."""
    import hashlib
    import json

    from util import files

    key = _graph_key(hp, weights, quantized is not None, stored)
    path = _graph_path(key)
    found = _read_graph(path)
    if found is not None and all(n in weights for n in found[1]):
        return found
    try:
        import onnx  # noqa: F401  (building a graph needs it; a kept one does not)
    except ImportError as e:
        raise _missing(e) from None
    onnx_model, external = build_step_graph(hp, weights, quantized, stored)
    graph, names = onnx_model.SerializeToString(), list(external)
    payload = json.dumps(names).encode() + b"\n" + graph
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(path, lambda f: f.write(_GRAPH_MAGIC + hashlib.sha256(payload).hexdigest().encode()
                                                    + b"\n" + payload), follow_symlinks=False)
    except OSError:
        pass
    return graph, names


class OnnxDecoder(RowDecoder):
    """Sequences decoded together with ONNX Runtime (the row table and interface of ``model.rows``).

    ``OnnxDecoder.from_model(m, quantize=None|"q8"|"q4")``.  ``quantize``: the weight format;
    ``quantized_path``: the cache file the quantized weights came from or went to (None for
    float32 or when no cache could be written); ``quantized_now``: True when they were made by
    this decoder (False: read from the cache).
    """

    engine = "onnx"
    aside = True  # a session runs calls from several threads at once

    @classmethod
    def from_model(cls, model, quantize: Optional[str] = None, cache_root=None,
                   threads: Optional[int] = None) -> "OnnxDecoder":
        """A decoder over a loaded ``Model`` (float32, or ``quantize`` weights made from it or read
        from the cache) or over a ``model.quantize.QuantizedModel`` (its own format)."""
        from . import quantize as q

        if isinstance(model, q.QuantizedModel):
            if quantize not in (None, model.fmt):
                raise ValueError(f"this model holds {model.fmt} weights, not {quantize}")
            return cls(model.hparams, None, model.quantized, threads=threads)
        weights = cpu_weights(model)
        if quantize is None:
            return cls(model.hparams, weights, None, threads=threads)
        quantized = q.load_or_make(weights, getattr(model, "path", None), quantize, model.hparams, cache_root)
        return cls(model.hparams, None, quantized, threads=threads)

    def __init__(self, hparams: HParams, weights: Optional[dict], quantized=None, threads: Optional[int] = None,
                 prepack: bool = True):
        """``weights``: float32 arrays by checkpoint name (conv1d as [in, out]), for float32 weight
        products; ``quantized``: a ``model.quantize.Quantized`` instead (its arrays hold the float
        ones too: biases, layer norms, embeddings for the input).  ``prepack``: see
        ``session_options``."""
        super().__init__(hparams)
        ort = _import_ort()
        self._ort = ort
        hp = hparams
        self.quantize = None if quantized is None else quantized.fmt
        self.quantized_path = None if quantized is None else quantized.path
        self.quantized_now = bool(quantized is not None and quantized.made)
        if quantized is not None:
            weights = quantized.arrays
        elif weights is None:
            raise ValueError("OnnxDecoder needs float32 weights or quantized ones")
        self.wte = weights["model/wte"]  # float16 with quantized weights: the input embedding only
        self.wpe = weights["model/wpe"]
        #: The file ONNX Runtime read the weights from (the quantized cache file), or None: they
        #: were handed over from memory.
        self.weights_file = None
        self._external = {}
        self.session = None
        if quantized is not None and quantized.stored is not None and quantized.path is not None:
            self.session = self._session_over_file(quantized, threads, prepack)
        if self.session is None:
            graph, names = graph_for(hp, weights, None if quantized is None else quantized.arrays)
            so = session_options(threads, prepack)
            external = {n: np.ascontiguousarray(weights[n]) for n in names}
            self._external = external  # the buffers must outlive the session
            if external:
                so.add_external_initializers(list(external),
                                             [ort.OrtValue.ortvalue_from_numpy(a) for a in external.values()])
            self.session = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        self._K: Optional[np.ndarray] = None  # [L, slots, H, capacity, D]
        self._V: Optional[np.ndarray] = None
        self._binding = None
        self._binding_key = None

    def _session_over_file(self, quantized, threads: Optional[int], prepack: bool):
        """A session whose weights ONNX Runtime reads from the checked cache file itself, or None
        when that file is no longer the one checked (``quantize.still_there``, before and after)
        or the session cannot be made so.  Read so, a weight that a kernel packs into its own
        layout (``MatMulNBits``'s) is let go once packed: it is never in memory twice, as it is
        when handed over from memory (where the session also copies every buffer not aligned to
        64 bytes)."""
        from .quantize import still_there

        path, stored = quantized.path, quantized.stored
        graph, names = graph_for(self.hparams, quantized.arrays, quantized.arrays, (path.name, stored.members))
        if names or not still_there(path, stored):
            return None
        so = session_options(threads, prepack)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        try:
            session = self._ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 (an ONNX Runtime without that option, a file gone)
            return None
        if not still_there(path, stored):
            return None
        self.weights_file = path
        return session

    # -- the engine's side of the row table ---------------------------------------------------

    def _cleared(self) -> None:
        self._K = self._V = None
        self._binding = self._binding_key = None

    def _copy(self, src: int, dst: int) -> None:
        n = int(self._n[src])
        self._K[:, dst, :, :n] = self._K[:, src, :, :n]
        self._V[:, dst, :, :n] = self._V[:, src, :, :n]

    def _save(self, slot: int):
        n = int(self._n[slot])
        return self._K[:, slot, :, :n].copy(), self._V[:, slot, :, :n].copy()

    def _load(self, slot: int, state) -> None:
        K, V = state
        n = K.shape[2]
        self._K[:, slot, :, :n] = K
        self._V[:, slot, :, :n] = V

    def _reserve(self, slots: int, positions: int) -> None:
        """Room for ``slots`` rows (grown by doubling).  Every slot has room for n_ctx + 1 positions
        from the start: a step writes the new token's keys and values of every slot in use at that
        slot's length, also for rows that do not step (their lengths do not advance, so it is
        overwritten later), so the capacity is always above the longest row.  The buffers are
        zeroed lazily by the system (``rows.lazy_zeros``: pages taken on first write): they
        cost memory only for the positions rows really hold, and never grow along the positions
        (growing them meant copying the whole cache: a step that did so took several times its
        neighbours' time)."""
        hp = self.hparams
        if self._K is not None and self._K.shape[1] >= slots:
            return
        old_slots = 0 if self._K is None else self._K.shape[1]
        new_slots = max(slots, old_slots, 1)
        if new_slots > old_slots and old_slots:
            new_slots = max(new_slots, min(2 * old_slots, new_slots + 8))
        shape = (hp.n_layer, new_slots, hp.n_head, hp.n_ctx + 1, hp.head_dim)
        K, V = lazy_zeros(shape), lazy_zeros(shape)  # never read past a row's length
        for slot in range(min(old_slots, self.rows)):  # only what is filled: untouched pages stay free
            n = int(self._n[slot])
            K[:, slot, :, :n] = self._K[:, slot, :, :n]
            V[:, slot, :, :n] = self._V[:, slot, :, :n]
        self._K, self._V = K, V
        self._binding = self._binding_key = None

    # -- runs -------------------------------------------------------------------------

    def _binding_over(self, first: int, count: int, x: np.ndarray, seqlens: np.ndarray, total: np.ndarray,
                      logits: np.ndarray, caches=None):
        """An IOBinding of the graph over slots first..first+count-1 of the cache (``caches``: (K, V),
        default the table's; written in place), with the given input and output buffers."""
        ov = self._ort.OrtValue.ortvalue_from_numpy
        io = self.session.io_binding()
        keep = [x, seqlens, total, logits]
        for name, a in (("x", x), ("seqlens", seqlens), ("total", total)):
            io.bind_ortvalue_input(name, ov(a))
        io.bind_ortvalue_output("logits", ov(logits))
        K, V = caches if caches is not None else (self._K, self._V)
        for i in range(self.hparams.n_layer):
            for kv, cache in (("k", K), ("v", V)):
                view = cache[i, first:first + count]  # contiguous: leading-axis slices
                value = ov(view)  # shares the numpy buffer
                io.bind_ortvalue_input(f"p{kv}{i}", value)
                io.bind_ortvalue_output(f"c{kv}{i}", value)
                keep.append(view)
        return io, keep

    def _prefill(self, slot: int, ids) -> np.ndarray:
        """Fill ``slot`` with a new row holding ``ids``; the logits after it [n_vocab]."""
        self._reserve(slot + 1, len(ids) + 1)
        return self._prefill_into(self._K, self._V, slot, ids)

    def _prefill_aside(self, seq: tuple):
        """The prefill of ``_prefill`` into caches of one row of their own, of the table's shape (the same
        graph over the same shapes: the same numbers); the session runs it beside the table's steps."""
        hp = self.hparams
        T = len(seq)
        shape = (hp.n_layer, 1, hp.n_head, hp.n_ctx + 1, hp.head_dim)
        K, V = lazy_zeros(shape), lazy_zeros(shape)  # pages taken only for the T positions written
        logits = self._prefill_into(K, V, 0, seq)
        return Parked(T, (K[:, 0, :, :T], V[:, 0, :, :T])), logits

    def _prefill_into(self, K: np.ndarray, V: np.ndarray, slot: int, ids) -> np.ndarray:
        hp = self.hparams
        ids = np.asarray(ids, dtype=np.int64)
        T = ids.shape[0]
        logits = np.empty((1, hp.n_vocab), np.float32)
        x = np.ascontiguousarray((self.wte[ids] + self.wpe[:T])[None])
        io, _keep = self._binding_over(slot, 1, x, np.array([T - 1], np.int32), np.array(T, np.int32), logits,
                                       caches=(K, V))
        self.session.run_with_iobinding(io)
        return logits[0]

    def _bind(self, B: int):
        """The IOBinding of a step over slots 0..B-1."""
        key = (B, id(self._K))
        if self._binding_key != key:
            hp = self.hparams
            self._x = np.zeros((B, 1, hp.n_embd), np.float32)
            self._logits = np.empty((B, hp.n_vocab), np.float32)
            self._seqlens = np.zeros(B, np.int32)
            self._total = np.zeros((), np.int32)
            self._binding, self._bound = self._binding_over(0, B, self._x, self._seqlens, self._total, self._logits)
            self._binding_key = key
        return self._binding

    def _step(self, slots, tokens, positions) -> np.ndarray:
        hp = self.hparams
        B = self.rows  # every slot in use runs; rows not stepping are computed and ignored
        self._reserve(B, int(self._n[:B].max()) + 1)
        io = self._bind(B)
        all_tok = np.zeros(B, np.int64)
        all_tok[slots] = tokens
        lengths = self._n[:B]
        np.add(self.wte[all_tok], self.wpe[np.minimum(lengths, hp.n_ctx - 1)], out=self._x[:, 0])
        self._seqlens[:] = lengths
        self._total[...] = int(lengths.max()) + 1
        self.session.run_with_iobinding(io)
        return self._logits[slots]
