"""8-bit and 4-bit weights for decoding, made from a checkpoint once and cached.

    from model import quantize
    q = quantize.load_or_make(weights, m.path, "q4")   # Quantized: .arrays, .path, .made
    q = quantize.ensure(m, "q8")                         # the same from a loaded Model
    qm = quantize.load_quantized("gpt2ja-small-dir", "q4")  # QuantizedModel: no TensorFlow
                                                         # when the cache file is there

The format is ONNX Runtime's ``MatMulNBits`` (``com.microsoft``): each weight
matrix W [K in, N out] is stored transposed as N rows of K values, cut into
blocks of ``BLOCK`` (32) values along K; every block has one float32 scale
and its values are rounded to ``round(w / scale)``, stored with an offset
(128 for 8 bits, 8 for 4 bits: the op's implicit zero point), two 4-bit
values per byte (even k in the low nibble).  The scale is the block's value
of largest magnitude divided by -128 (q8) or -8 (q4), as llama.cpp's Q8_0 /
Q4_0 do, so that all 256 / 16 levels are used: that value is exact and
the others lie in [-8, 8) steps (the rare +8 is clipped to 7).  On a
fine-tuned tiny model this gave q4 a mean KL divergence of 0.011 against
0.014 for the symmetric max/7 scale.  Quantized are the four matrices of every block and the
token embedding (the tied output projection, ``wte`` [V, E], already N x K);
biases, layer norms and the position embedding stay float32, and the token
embedding for the input (one row gathered per token) is kept as float16.
A cache file holds all of them and the hyperparameters, so that a quantized
model decodes from its cache file alone (``load_quantized``: no TensorFlow,
no float32 copy of the weights in memory).

Cache: one ``.npz`` file per checkpoint and format, named by a key of the
checkpoint's contents (sha256 of its ``.index`` file and its ``hparams.json``, the data files'
names, sizes and modification times, the format, the block size and this
module's ``VERSION``).  It is written beside the checkpoint (``DIR/quantized/``) when
that directory is writable, else under the model cache
(``$GPT2JA_HOME/quantized``, default ``$XDG_CACHE_HOME/gpt2-japanese`` or
``~/.cache/gpt2-japanese``), atomically (``util.files.atomic_write``).  A
cache file is used only when it names the same key, format, block size and
version and holds every array with the expected shape and type (its zip
checksums are verified on reading); anything else -- a truncated or
corrupted file, one made for another checkpoint -- is made again and
replaced, never trusted.  Beside the checkpoint, a new file replaces the files
that earlier contents of the same checkpoint left there.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

from util.files import atomic_write

from .errors import ModelError
from .hparams import HParams, variable_shapes

FORMATS = ("q8", "q4")
BITS = {"q8": 8, "q4": 4}
BLOCK = 32
VERSION = 3
SUBDIR = "quantized"
_META = "__meta__"


def quantize_matrix(wt: np.ndarray, bits: int, block: int = BLOCK) -> Tuple[np.ndarray, np.ndarray]:
    """wt [N, K] float32 -> (q uint8 [N, ceil(K/block), block*bits/8], scales float32 [N*ceil(K/block)]).

    Per block: scale = (the value of largest magnitude) / -2**(bits-1) (negative for a positive
    extreme), q = clip(round(w / scale) + 2**(bits-1), 0, 2**bits - 1) (MatMulNBits' implicit
    zero point); K is padded with zeros to a whole number of blocks."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    wt = np.asarray(wt, dtype=np.float32)
    N, K = wt.shape
    nb = -(-K // block)
    if nb * block != K:
        wt = np.concatenate([wt, np.zeros((N, nb * block - K), np.float32)], axis=1)
    wb = wt.reshape(N, nb, block)
    half = np.float32(2 ** (bits - 1))
    extreme = np.take_along_axis(wb, np.abs(wb).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    scale = extreme / -half
    scale[scale == 0] = 1.0
    q = wb / scale[:, :, None]
    np.rint(q, out=q)
    q += half
    np.clip(q, 0, 2 ** bits - 1, out=q)
    q = q.astype(np.uint8)
    if bits == 4:
        q = q[:, :, 0::2] | (q[:, :, 1::2] << 4)
    return np.ascontiguousarray(q), np.ascontiguousarray(scale.reshape(-1), dtype=np.float32)


def dequantize_matrix(q: np.ndarray, scales: np.ndarray, bits: int, K: int) -> np.ndarray:
    """The float32 [N, K] matrix that (q, scales) stand for (for checks and tests)."""
    N, nb = q.shape[0], q.shape[1]
    if bits == 4:
        v = np.empty((N, nb, q.shape[2] * 2), np.float32)
        v[:, :, 0::2] = q & 0x0F
        v[:, :, 1::2] = q >> 4
    else:
        v = q.astype(np.float32)
    v -= np.float32(2 ** (bits - 1))
    v *= scales.reshape(N, nb, 1)
    return v.reshape(N, -1)[:, :K]


#: The quantized matrices: name in the cache -> (checkpoint weight name, transposed to [N, K]?).
def matrix_names(hp: HParams) -> Dict[str, Tuple[str, bool]]:
    names = {}
    for i in range(hp.n_layer):
        for k in ("attn/c_attn/w", "attn/c_proj/w", "mlp/c_fc/w", "mlp/c_proj/w"):
            names[f"h{i}/{k}"] = (f"model/h{i}/{k}", True)  # stored [in=K, out=N]
    names["wte"] = ("model/wte", False)  # [V=N, E=K]: logits = x @ wte.T
    return names


def float_shapes(hp: HParams) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """The arrays kept in floating point beside the quantized matrices: checkpoint name -> (shape,
    dtype).  ``model/wte`` (float16) is the input embedding only; the output projection is ``wte/q``."""
    out = {"model/wte": ((hp.n_vocab, hp.n_embd), "float16"), "model/wpe": ((hp.n_ctx, hp.n_embd), "float32")}
    for name, shape in variable_shapes(hp).items():
        if len(shape) == 1:  # biases and layer norms
            out[name] = (shape, "float32")
    return out


def expected_shapes(hp: HParams, fmt: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Every array a cache file of ``fmt`` holds for hparams ``hp``: name -> (shape, dtype)."""
    bits = BITS[fmt]
    E, V = hp.n_embd, hp.n_vocab
    kn = {"attn/c_attn/w": (E, 3 * E), "attn/c_proj/w": (E, E), "mlp/c_fc/w": (E, 4 * E),
          "mlp/c_proj/w": (4 * E, E)}
    out = {}
    for name in matrix_names(hp):
        K, N = (E, V) if name == "wte" else kn[name.split("/", 1)[1]]
        nb = -(-K // BLOCK)
        out[name + "/q"] = ((N, nb, BLOCK * bits // 8), "uint8")
        out[name + "/s"] = ((N * nb,), "float32")
    out.update(float_shapes(hp))
    return out


def quantize_weights(weights, hp: HParams, fmt: str) -> Dict[str, np.ndarray]:
    """The quantized arrays (``name/q``, ``name/s``) of ``weights`` (checkpoint names -> float32 arrays,
    conv1d weights as [in, out], e.g. ``npdecode.cpu_weights(m)``), and the arrays of
    ``float_shapes`` (copies, in their types)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    out = {name: np.array(weights[name], dtype=dtype) for name, (_, dtype) in float_shapes(hp).items()}
    for name, (source, transpose) in matrix_names(hp).items():
        w = np.asarray(weights[source], dtype=np.float32)
        q, s = quantize_matrix(np.ascontiguousarray(w.T) if transpose else w, BITS[fmt])
        out[name + "/q"], out[name + "/s"] = q, s
    return out


# -- the cache ----------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """The model cache (what ``hub.cache_dir()`` gives, computed from the same variables):
    ``$GPT2JA_HOME``, else ``$XDG_CACHE_HOME/gpt2-japanese`` (absolute only), else
    ``~/.cache/gpt2-japanese``."""
    home = os.environ.get("GPT2JA_HOME")
    if home:
        return Path(os.path.expanduser(home))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "gpt2-japanese"
    return Path(os.path.expanduser("~/.cache/gpt2-japanese"))


def checkpoint_key(prefix: str | os.PathLike, fmt: str) -> str:
    """A key of the checkpoint ``prefix`` (``DIR/model-N``) and the format: sha256 over the ``.index``
    file's bytes, each data file's name, size and modification time, the format, block size and
    VERSION.  Cheap: the data files are not read."""
    prefix = str(prefix)
    h = hashlib.sha256()
    try:
        with open(prefix + ".index", "rb") as f:
            h.update(f.read())
        hparams_file = os.path.join(os.path.dirname(prefix), "hparams.json")
        if os.path.isfile(hparams_file):
            with open(hparams_file, "rb") as f:
                h.update(b"\0hparams.json\0" + f.read())
        for data in sorted(glob.glob(glob.escape(prefix) + ".data-*")):
            st = os.stat(data)
            h.update(f"\0{os.path.basename(data)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    except OSError as e:
        raise ModelError(f"cannot read checkpoint {prefix}: {e.strerror or e}") from None
    h.update(f"\0{fmt}\0{BLOCK}\0{VERSION}".encode())
    return h.hexdigest()


def cache_file_name(prefix: str | os.PathLike, fmt: str, key: str) -> str:
    return f"{os.path.basename(str(prefix))}.{fmt}-{key[:24]}.npz"


def cache_candidates(prefix: str | os.PathLike, fmt: str, key: str,
                     cache_root: Optional[str | os.PathLike] = None) -> Tuple[Path, Path]:
    """Where the cache file may be: beside the checkpoint, and under the model cache."""
    name = cache_file_name(prefix, fmt, key)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return Path(os.path.dirname(os.path.abspath(str(prefix)))) / SUBDIR / name, root / SUBDIR / name


class Quantized(NamedTuple):
    """Quantized weights: ``arrays`` (``name/q``, ``name/s``), the cache ``path`` they were read from
    or written to (None when not cached), and ``made`` (True when they were quantized now)."""

    fmt: str
    arrays: Dict[str, np.ndarray]
    path: Optional[Path]
    made: bool


def _meta(key: str, fmt: str, hp: HParams) -> dict:
    return {"key": key, "format": fmt, "block": BLOCK, "version": VERSION, "hparams": hp.to_dict()}


def read_cache(path: Path, hp: Optional[HParams], fmt: str, key: str
               ) -> Optional[Tuple[HParams, Dict[str, np.ndarray]]]:
    """(hparams, arrays) of the cache file ``path``, or None when it is missing, unreadable,
    corrupted (zip checksums), or not exactly what key, format and hparams ask for.  ``hp`` None:
    the hparams the file names (checked to be valid)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z[_META]).decode())
            if not isinstance(meta, dict):
                return None
            try:
                stored = HParams.from_dict(meta.get("hparams"), source=str(path))
            except (ModelError, TypeError, AttributeError):
                return None
            if hp is not None and stored != hp:
                return None
            if meta != _meta(key, fmt, stored):
                return None
            want = expected_shapes(stored, fmt)
            if set(z.files) != set(want) | {_META}:
                return None
            arrays = {}
            for name, (shape, dtype) in want.items():
                a = z[name]  # reading checks the member's CRC
                if a.shape != shape or a.dtype != np.dtype(dtype):
                    return None
                arrays[name] = a
            return stored, arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError):
        return None


def _read_any(candidates, hp: Optional[HParams], fmt: str, key: str) -> Optional[Tuple[HParams, Quantized]]:
    """The first valid cache file among ``candidates`` (see ``read_cache``), as (hparams, Quantized)."""
    for path in candidates:
        found = read_cache(path, hp, fmt, key)
        if found is not None:
            return found[0], Quantized(fmt, found[1], path, False)
    return None


def _write_cache(path: Path, arrays: Dict[str, np.ndarray], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(arrays)
    payload[_META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **payload))


def _remove_stale(path: Path, prefix, fmt: str) -> None:
    """Beside the checkpoint, remove this format's files of earlier contents of the same checkpoint
    (same name, another key: the checkpoint was overwritten).  Never under the shared model cache,
    where checkpoints of other directories may share the name."""
    for old in path.parent.glob(glob.escape(f"{os.path.basename(str(prefix))}.{fmt}-") + "*.npz"):
        if old != path:
            try:
                old.unlink()
            except OSError:
                pass


def load_or_make(weights, prefix: Optional[str | os.PathLike], fmt: str, hp: HParams,
                 cache_root: Optional[str | os.PathLike] = None) -> Quantized:
    """The ``fmt`` weights of the checkpoint ``prefix`` whose float32 weights are ``weights``:
    read from the cache when a valid file is there, else quantized now and written to the cache
    (beside the checkpoint when its directory is writable, else under ``cache_root``, default
    ``default_cache_root()``).  ``prefix`` None (weights without a checkpoint) quantizes without
    caching.  A cache that cannot be written anywhere is not an error: the weights are used anyway."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if prefix is None:
        return Quantized(fmt, quantize_weights(weights, hp, fmt), None, True)
    key = checkpoint_key(prefix, fmt)
    candidates = cache_candidates(prefix, fmt, key, cache_root)
    found = _read_any(candidates, hp, fmt, key)
    if found is not None:
        return found[1]
    arrays = quantize_weights(weights, hp, fmt)
    meta = _meta(key, fmt, hp)
    for path in candidates:
        try:
            _write_cache(path, arrays, meta)
        except OSError:
            continue
        if path == candidates[0]:
            _remove_stale(path, prefix, fmt)
        return Quantized(fmt, arrays, path, True)
    return Quantized(fmt, arrays, None, True)


def ensure(m, fmt: str, cache_root: Optional[str | os.PathLike] = None) -> Quantized:
    """``load_or_make`` for a loaded Model ``m`` (its checkpoint is ``m.path``)."""
    from .npdecode import cpu_weights

    return load_or_make(cpu_weights(m), getattr(m, "path", None), fmt, m.hparams, cache_root)


class QuantizedModel:
    """A model to decode with 8-/4-bit weights only (``model.decoder(qm)`` gives its ``OnnxDecoder``):
    ``hparams``, ``path`` (the checkpoint prefix), ``device`` (always the CPU), ``fmt`` and
    ``quantized`` (the ``Quantized`` arrays).  Holds no float32 weight matrices and no TensorFlow
    objects; ``tasks.generate.Generator`` takes it like a ``Model``."""

    device = "/CPU:0"

    def __init__(self, hparams: HParams, path: str, quantized: Quantized):
        self.hparams, self.path, self.quantized = hparams, path, quantized
        self.fmt = quantized.fmt


def load_quantized(model_dir: str | os.PathLike, fmt: str,
                   cache_root: Optional[str | os.PathLike] = None) -> QuantizedModel:
    """The ``fmt`` model of a model directory, read from its cache file without TensorFlow when a
    valid one is there (see ``cache_candidates``); otherwise the checkpoint is loaded
    (``model.load``, TensorFlow), quantized and cached as ``load_or_make`` does, and its float32
    weights are let go.  ModelError for a directory that holds no checkpoint."""
    from .checkpoint import find_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    prefix = find_checkpoint(model_dir)
    key = checkpoint_key(prefix, fmt)
    found = _read_any(cache_candidates(prefix, fmt, key, cache_root), None, fmt, key)
    if found is not None:
        return QuantizedModel(found[0], prefix, found[1])
    from .gpt2 import load

    m = load(model_dir)
    q = ensure(m, fmt, cache_root)
    hp = m.hparams
    del m
    return QuantizedModel(hp, prefix, q)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (Frobenius)."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


__all__ = ["FORMATS", "BLOCK", "VERSION", "Quantized", "QuantizedModel", "load_quantized", "quantize_matrix", "dequantize_matrix", "quantize_weights",
           "load_or_make", "ensure", "checkpoint_key", "default_cache_root", "read_cache",
           "relative_error"]
