"""Finding, reading and writing TF1 name-based GPT-2 checkpoints.

On disk a model directory holds what the original tools wrote::

    checkpoint                         state file: model_checkpoint_path: "model-N"
    model-N.index                      TensorFlow bundle index
    model-N.data-00000-of-00001        the float32 weights
    hparams.json                       optional: n_vocab, n_ctx, n_embd, n_head, n_layer

with variables ``model/wte``, ``model/wpe``, ``model/hI/...`` and ``model/ln_f/...``
(see ``model.hparams.variable_shapes``).

Importing this module does not import TensorFlow; the functions that need it
import it on first use.  Every problem a user can cause is reported as
``ModelError`` with a one-line message naming the file or variable.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from util.files import atomic_write

from .errors import ModelError
from .hparams import HEAD_WIDTH, HParams, variable_shapes

STATE_FILE = "checkpoint"
HPARAMS_FILE = "hparams.json"
_LAYER_RE = re.compile(r"^model/h(\d+)/")


# --------------------------------------------------------------------------- finding

def _unescape_proto_string(s: str) -> str:
    """Undo the C-style escaping of a text-format protobuf string."""
    out = bytearray()
    i = 0
    simple = {"n": b"\n", "t": b"\t", "r": b"\r", "\\": b"\\", '"': b'"', "'": b"'",
              "a": b"\a", "b": b"\b", "f": b"\f", "v": b"\v", "?": b"?"}
    while i < len(s):
        c = s[i]
        if c != "\\" or i + 1 == len(s):
            out += c.encode("utf-8")
            i += 1
            continue
        nxt = s[i + 1]
        if nxt in simple:
            out += simple[nxt]
            i += 2
        elif nxt in "01234567":
            j = i + 1
            while j < len(s) and j < i + 4 and s[j] in "01234567":
                j += 1
            out.append(int(s[i + 1:j], 8) & 0xFF)
            i = j
        elif nxt == "x":
            j = i + 2
            while j < len(s) and j < i + 4 and s[j] in "0123456789abcdefABCDEF":
                j += 1
            out.append(int(s[i + 2:j] or "0", 16) & 0xFF)
            i = j
        else:
            out += nxt.encode("utf-8")
            i += 2
    return out.decode("utf-8", "surrogateescape")


def _escape_proto_string(s: str) -> str:
    out = []
    for byte in s.encode("utf-8", "surrogateescape"):
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append("\\%03o" % byte)
    return "".join(out)


def read_state_file(path: str | os.PathLike) -> Tuple[Optional[str], List[str]]:
    """Parse a ``checkpoint`` state file: (model_checkpoint_path, all_model_checkpoint_paths)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    current, every = None, []
    for m in re.finditer(r'^\s*(model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"((?:[^"\\]|\\.)*)"',
                         text, re.M):
        value = _unescape_proto_string(m.group(2))
        if m.group(1) == "model_checkpoint_path":
            current = value
        else:
            every.append(value)
    return current, every


def _resolve_in_dir(directory: Path, recorded: str) -> Path:
    """Where a path recorded in a state file is now.

    Relative paths are relative to the directory; an absolute path that no
    longer exists (the directory was moved or copied) is looked up by its file
    name in this directory.
    """
    p = Path(recorded)
    if not p.is_absolute():
        return directory / p
    if Path(str(p) + ".index").is_file():
        return p
    return directory / p.name


def _newest_index(directory: Path) -> Optional[Path]:
    numbered, other = [], []
    for f in directory.iterdir():
        if not f.name.endswith(".index") or not f.is_file():
            continue
        prefix = f.name[: -len(".index")]
        m = re.fullmatch(r"(.*)-(\d+)", prefix)
        if m:
            numbered.append((int(m.group(2)), m.group(1) == "model", prefix))
        else:
            other.append(prefix)
    if numbered:
        return directory / max(numbered)[2]
    if len(other) == 1:
        return directory / other[0]
    return None


def find_checkpoint(model_dir: str | os.PathLike) -> str:
    """The checkpoint prefix (``DIR/model-N``) to load from a model directory.

    The ``checkpoint`` state file decides (its path may be relative, or absolute
    and stale after the directory was moved: then the same file name in this
    directory is used); without a state file, the ``model-N.index`` with the
    largest N.  Raises ModelError when there is no usable checkpoint or the
    directory cannot be read.
    """
    try:
        return _find_checkpoint(model_dir)
    except OSError as e:
        raise ModelError(f"cannot read model directory {model_dir}: {e.strerror or e}") from None


def _find_checkpoint(model_dir: str | os.PathLike) -> str:
    directory = Path(model_dir)
    if not directory.exists():
        raise ModelError(f"model directory {directory} does not exist")
    if not directory.is_dir():
        raise ModelError(f"model path {directory} is not a directory")
    state = directory / STATE_FILE
    if state.is_file():
        recorded, _ = read_state_file(state)
        if recorded:
            prefix = _resolve_in_dir(directory, recorded)
            if not Path(str(prefix) + ".index").is_file():
                raise ModelError(f"{state} names checkpoint {recorded!r} but {prefix}.index does not exist")
            return str(prefix)
    try:
        prefix = _newest_index(directory)
    except OSError as e:
        raise ModelError(f"cannot list model directory {directory}: {e.strerror or e}") from None
    if prefix is None:
        raise ModelError(f"no checkpoint in {directory} (expected a 'checkpoint' state file or model-N.index)")
    return str(prefix)


# --------------------------------------------------------------------------- hparams

def infer_hparams(shapes: Mapping[str, Tuple[int, ...]], source: str = "checkpoint") -> HParams:
    """HParams from variable shapes: n_vocab/n_embd from wte, n_ctx from wpe,
    n_layer from the number of ``model/hN`` scopes, n_head = n_embd // 64."""
    for name in ("model/wte", "model/wpe"):
        if name not in shapes:
            raise ModelError(f"{source}: missing variable {name}")
        if len(shapes[name]) != 2:
            raise ModelError(f"{source}: variable {name} has shape {list(shapes[name])}, expected 2 dimensions")
    n_vocab, n_embd = (int(d) for d in shapes["model/wte"])
    n_ctx, wpe_embd = (int(d) for d in shapes["model/wpe"])
    if wpe_embd != n_embd:
        raise ModelError(f"{source}: variable model/wpe has shape {list(shapes['model/wpe'])}, "
                         f"expected [{n_ctx}, {n_embd}] (the width of model/wte)")
    layers = {int(m.group(1)) for m in map(_LAYER_RE.match, shapes) if m}
    if not layers:
        raise ModelError(f"{source}: no transformer blocks (model/h0/...) in the checkpoint")
    if n_embd % HEAD_WIDTH:
        raise ModelError(f"{source}: cannot infer n_head for n_embd={n_embd} (not a multiple of {HEAD_WIDTH}); "
                         f"add an {HPARAMS_FILE}")
    return HParams(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd,
                   n_head=n_embd // HEAD_WIDTH, n_layer=max(layers) + 1)


def check_shapes(hp: HParams, shapes: Mapping[str, Tuple[int, ...]], source: str = "checkpoint",
                 hparams_source: Optional[str] = None) -> None:
    """Raise ModelError naming the first missing or misshaped variable, or an extra block."""
    where = f" (per {hparams_source})" if hparams_source else ""
    for name, expected in variable_shapes(hp).items():
        if name not in shapes:
            raise ModelError(f"{source}: missing variable {name} (expected shape {list(expected)})")
        found = tuple(int(d) for d in shapes[name])
        if found != tuple(expected):
            raise ModelError(f"{source}: variable {name} has shape {list(found)}, expected {list(expected)}{where}")
    extra = sorted({int(m.group(1)) for m in map(_LAYER_RE.match, shapes) if m} - set(range(hp.n_layer)))
    if extra:
        raise ModelError(f"{source}: has block model/h{extra[0]} but n_layer={hp.n_layer}{where}")


def model_hparams(model_dir: str | os.PathLike, shapes: Mapping[str, Tuple[int, ...]],
                  source: str = "checkpoint") -> Tuple[HParams, Optional[str]]:
    """(hparams, where they came from): hparams.json if present, else inferred from shapes."""
    path = Path(model_dir) / HPARAMS_FILE
    if path.is_file():
        return HParams.from_json_file(path), str(path)
    return infer_hparams(shapes, source), None


# --------------------------------------------------------------------------- reading

def _tf_message(e: BaseException) -> str:
    """The first line of an exception's message (TF's carry long multi-line contexts)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    msg = (getattr(e, "message", None) or str(e) or "").strip()
    line = msg.splitlines()[0].strip() if msg else ""
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line)
    if not line:
        return type(e).__name__
    return line[:300]


def read_errors():
    """The exception types that reading a checkpoint may raise (wrapped into ModelError).

    TensorFlow's checkpoint reader raises tf.errors.*, but also IndexError
    ("Read less bytes than requested" on a truncated data file), ValueError,
    RuntimeError...; anything it raises means the file cannot be read.
    """
    return (Exception,)


class CheckpointReader:
    """Reads variables one at a time from a checkpoint prefix (wraps TF's reader).

    ``shapes`` maps names to shapes; ``get(name)`` returns a float32 numpy array.
    Errors become ModelError naming the checkpoint file.
    """

    def __init__(self, prefix: str):
        from ._tf import import_tf
        tf = import_tf()
        self.prefix = str(prefix)
        index = self.prefix + ".index"
        if not os.path.isfile(index):
            raise ModelError(f"checkpoint index {index} does not exist")
        parent, stem = os.path.split(self.prefix)
        try:
            has_data = any(f.startswith(stem + ".data-") for f in os.listdir(parent or "."))
        except OSError:
            has_data = False
        if not has_data:
            raise ModelError(f"checkpoint data file {self.prefix}.data-00000-of-00001 does not exist")
        data = sorted(f for f in os.listdir(parent or ".") if f.startswith(stem + ".data-"))
        self.data_name = os.path.join(parent, data[0]) if len(data) == 1 else self.prefix + ".data-*"
        try:
            self._reader = tf.compat.v1.train.NewCheckpointReader(self.prefix)
            self.shapes = {k: tuple(v) for k, v in self._reader.get_variable_to_shape_map().items()}
            self.dtypes = dict(self._reader.get_variable_to_dtype_map())
        except read_errors() as e:
            raise ModelError(f"cannot read checkpoint {index}: {_tf_message(e)}") from None

    def get(self, name: str):
        import numpy as np
        dtype = self.dtypes.get(name)
        if dtype is not None and not dtype.is_floating:
            raise ModelError(f"{self.prefix}: variable {name} has dtype {dtype.name}, expected float32")
        try:
            value = self._reader.get_tensor(name)
        except read_errors() as e:
            raise ModelError(f"cannot read variable {name} from {self.data_name} (truncated or corrupted?): "
                             f"{_tf_message(e)}") from None
        if value.dtype != np.float32:
            value = value.astype(np.float32)
        return value


def open_checkpoint(model_dir: str | os.PathLike) -> Tuple[CheckpointReader, HParams]:
    """Find, open and validate the checkpoint of a model directory (reads no weights yet)."""
    prefix = find_checkpoint(model_dir)
    reader = CheckpointReader(prefix)
    hp, hp_source = model_hparams(model_dir, reader.shapes, source=prefix)
    check_shapes(hp, reader.shapes, source=prefix, hparams_source=hp_source)
    return reader, hp


# --------------------------------------------------------------------------- writing

def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_state_file(out_dir: str | os.PathLike, name: str) -> None:
    """(Re)write ``out_dir/checkpoint`` naming checkpoint ``name`` (relative), keeping
    earlier entries whose index still exists; atomically (temp file + os.replace)."""
    directory = Path(out_dir)
    state = directory / STATE_FILE
    previous: List[str] = []
    if state.is_file():
        try:
            _, every = read_state_file(state)
        except ModelError:
            every = []
        for rec in every:
            rel = _resolve_in_dir(directory, rec)
            if rel.parent == directory and rel.name != name and Path(str(rel) + ".index").is_file():
                previous.append(rel.name)
    lines = [f'model_checkpoint_path: "{_escape_proto_string(name)}"']
    lines += [f'all_model_checkpoint_paths: "{_escape_proto_string(p)}"' for p in previous + [name]]
    _atomic_write_text(state, "\n".join(lines) + "\n")


def save(weights, out_dir: str | os.PathLike, *, step: int = 0, hparams: Optional[HParams] = None,
         name: str = "model") -> str:
    """Write a checkpoint in the released layout and return its prefix.

    ``weights`` is a ``Model`` or a mapping from checkpoint variable names
    (``model/wte``, ``model/h0/attn/c_attn/w`` [1, E, 3E], ...) to arrays or
    tf.Tensors of the checkpoint shapes.  Writes ``out_dir/{name}-{step}.index``
    and ``.data-00000-of-00001``, then ``hparams.json``, then -- last, via a
    temporary file and os.replace -- the ``checkpoint`` state file (relative
    path), so a reader never sees a state file naming a half-written
    checkpoint.  ``hparams`` defaults to the model's, or is inferred from the
    shapes.  The result loads back with ``model.load`` and with TF1's
    ``tf.compat.v1.train.Saver`` over variables of those names.
    """
    from ._tf import import_tf
    tf = import_tf()
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ModelError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if hasattr(weights, "checkpoint_tensors") and callable(weights.checkpoint_tensors):
        if hparams is None:
            hparams = weights.hparams
        weights = weights.checkpoint_tensors()
    if not isinstance(weights, Mapping):
        raise ModelError("save() expects a Model or a mapping of checkpoint variable names to arrays")
    shapes = {k: tuple(int(d) for d in v.shape) for k, v in weights.items()}
    source = "weights to save"
    hp_source = None
    if hparams is None:
        hparams = infer_hparams(shapes, source)
    else:
        hp_source = "the given hparams"
    check_shapes(hparams, shapes, source=source, hparams_source=hp_source)
    names = list(variable_shapes(hparams))
    directory = Path(out_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create {directory}: {e.strerror or e}") from None
    ckpt_name = f"{name}-{step}"
    prefix = str(directory / ckpt_name)
    tensors = []
    for n in names:
        v = weights[n]
        if isinstance(v, (tf.Tensor, tf.Variable)):
            v = v if v.dtype == tf.float32 else tf.cast(v, tf.float32)
        else:
            import numpy as np
            v = tf.convert_to_tensor(np.asarray(v, dtype=np.float32))
        tensors.append(v)
    try:
        with tf.device("/CPU:0"):
            tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                              tensors=tensors)
        _atomic_write_text(directory / HPARAMS_FILE, hparams.to_json())
        write_state_file(directory, ckpt_name)
    except (tf.errors.OpError, OSError) as e:
        raise ModelError(f"cannot write checkpoint {prefix}: {_tf_message(e)}") from None
    return prefix


def random_weights(hparams: HParams, seed: int = 0, numpy: bool = False) -> Dict[str, object]:
    """Random weights of the given shape, keyed by checkpoint variable name.

    GPT-2's initialisation: normal(0, 0.02) matrices and token embeddings,
    normal(0, 0.01) position embeddings, residual projections (``c_proj``)
    scaled by 1/sqrt(2 * n_layer), zero biases, layer norms g=1, b=0, so that
    activations stay finite at any depth.  Deterministic for a given seed.
    Values are float32 tf.Tensors generated one at a time on the CPU (about
    one copy of the weights in memory), or numpy arrays with ``numpy=True``.
    """
    from ._tf import import_tf
    tf = import_tf()
    out: Dict[str, object] = {}
    proj_scale = 1.0 / math.sqrt(2.0 * hparams.n_layer)
    with tf.device("/CPU:0"):
        for i, (name, shape) in enumerate(variable_shapes(hparams).items()):
            leaf = name.rsplit("/", 1)[1]
            if leaf == "b":
                value = tf.zeros(shape, tf.float32)
            elif leaf == "g":
                value = tf.ones(shape, tf.float32)
            else:
                std = 0.01 if name == "model/wpe" else 0.02
                if name.endswith("c_proj/w"):
                    std *= proj_scale
                value = tf.random.stateless_normal(shape, seed=[int(seed), i], stddev=std, dtype=tf.float32)
            out[name] = value.numpy() if numpy else value
    return out
