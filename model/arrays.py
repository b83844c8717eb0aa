"""Float32 weights for CPU decoding without TensorFlow: memory-mapped from the checkpoint itself.

    import model
    m = model.load_for_decoding("models/gpt2ja-small")   # ArrayModel (no TensorFlow) or Model
    dec = model.decoder(m)                                # numpy or ONNX Runtime, float32

Decoding on the CPU (the numpy and ONNX Runtime engines) needs the weights as
arrays, not TensorFlow's variables, and importing TensorFlow costs seconds of
every start.  ``load_for_decoding`` reads the checkpoint with ``model.bundle``
(TensorFlow's format parsed directly, each tensor a read-only view of the
mapped data file: no copy, pages shared between processes) -- but only a
checkpoint TensorFlow has read whole before, since that reader checks every
tensor's CRC32C and this one cannot afford to.  The first load of a
checkpoint therefore goes through ``model.load`` (TensorFlow) and then leaves
a small record under the model cache
(``$GPT2JA_HOME/quantized/trusted/model-N.f32-KEY.json``; nothing is written
into the model's directory): the key covers the ``.index`` file's
bytes and ``hparams.json``, and the record holds each data file's size,
modification and change times, inode and device.  Any change to the
checkpoint -- rewritten, touched, copied elsewhere -- makes the next start
read it with TensorFlow again.  A checkpoint this reader cannot take (another
dtype, compressed or sliced) is simply always loaded with TensorFlow.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from util import files as _files

from .bundle import BundleError, open_bundle
from .checkpoint import check_shapes, find_checkpoint, model_hparams
from .errors import ModelError
from .hparams import HParams, variable_shapes
from .quantize import SUBDIR, checkpoint_key, data_stamps, default_cache_root

#: The "format" of the record in the cache key (so that it never matches a quantized file's).
FORMAT = "f32"


class ArrayModel:
    """A float32 model to decode on the CPU: ``hparams``, ``path`` (the checkpoint prefix),
    ``variables`` (read-only numpy arrays by checkpoint name, conv1d as [in, out]), ``device``
    (the CPU) and ``precision`` ('fp32').  Holds no TensorFlow objects; ``model.decoder`` gives a
    numpy or ONNX Runtime decoder over it (not 'tf'), and ``tasks.generate.Generator`` takes it
    like a ``Model``."""

    device = "/CPU:0"
    precision = "fp32"

    def __init__(self, hparams: HParams, variables: Dict[str, np.ndarray], path: str):
        self.hparams, self.variables, self.path = hparams, variables, path


def _record_path(prefix: str, key: str, cache_root=None) -> Path:
    """Under the model cache only: nothing is written into a model's own directory (which may be
    read-only, shared, or packed up again).  The key and the stamps tell checkpoints apart."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / SUBDIR / "trusted" / f"{os.path.basename(prefix)}.{FORMAT}-{key[:32]}.json"


def _record(key: str, prefix: str) -> dict:
    return {"key": key, "format": FORMAT, "stamps": data_stamps(prefix)}


def trusted(prefix: str | os.PathLike, cache_root=None) -> bool:
    """Whether TensorFlow has read the checkpoint ``prefix`` whole, as it is now (a valid record)."""
    prefix = str(prefix)
    key = checkpoint_key(prefix, FORMAT)
    return _files.read_record(_record_path(prefix, key, cache_root)) == _record(key, prefix)


def remember(prefix: str | os.PathLike, cache_root=None) -> Optional[Path]:
    """Record that TensorFlow has just read the checkpoint ``prefix`` whole (under the model cache);
    the path written, or None when it cannot be written (not an error: the next start reads the
    checkpoint with TensorFlow again)."""
    prefix = str(prefix)
    key = checkpoint_key(prefix, FORMAT)
    path = _record_path(prefix, key, cache_root)
    return path if _files.write_record(path, _record(key, prefix)) else None


def load_arrays(model_dir: str | os.PathLike, cache_root=None) -> Optional[ArrayModel]:
    """The float32 model of ``model_dir`` memory-mapped without TensorFlow, or None when its
    checkpoint is not trusted yet (see ``trusted``) or not one ``model.bundle`` can read."""
    prefix = find_checkpoint(model_dir)
    if not trusted(prefix, cache_root):
        return None
    try:
        b = open_bundle(prefix)
        hp, hp_source = model_hparams(model_dir, b.shapes, source=prefix)
        check_shapes(hp, b.shapes, source=prefix, hparams_source=hp_source)
        variables = {}
        for name in variable_shapes(hp):
            a = b.array(name)
            variables[name] = a[0] if name.endswith("/w") else a  # conv1d [1, in, out] -> [in, out]
    except (BundleError, OSError, ModelError, KeyError):
        return None  # TensorFlow reads it instead, and says what is wrong if anything is
    return ArrayModel(hp, variables, prefix)


def load_for_decoding(model_dir: str | os.PathLike, cache_root=None) -> Union[ArrayModel, "object"]:
    """A float32 model to decode on the CPU: an ``ArrayModel`` without TensorFlow when the checkpoint
    is trusted (``load_arrays``), else ``model.load(model_dir)`` -- which checks every tensor -- after
    which the checkpoint is remembered as trusted for the next start."""
    m = load_arrays(model_dir, cache_root)
    if m is not None:
        return m
    from .gpt2 import load

    m = load(model_dir)
    remember(m.path, cache_root)
    return m


__all__ = ["ArrayModel", "FORMAT", "load_arrays", "load_for_decoding", "remember", "trusted"]
