"""Incremental decoding engines: one row table, three engines, and the factory choosing one.

    import model
    dec = model.decoder(m)                        # chosen by choose_engine (see below)
    logits = dec.add([0, 1], [[1, 2, 3], [4, 5]]) # two sequences by id: logits [2, n_vocab]
    logits = dec.step([0, 1], [42, 7])            # one more token each
    dec.truncate(0, 2); dec.remove([1])           # cut sequence 0 to 2 tokens; 1 leaves

Every engine is a ``model.rows.RowDecoder``: the row table (sequences by id, their lengths,
joining and leaving at any step, cuts, restarts, checks) is written once there, and an engine
implements only its prefill and its step.  ``npdecode.NumpyDecoder`` (engine 'numpy') decodes with
numpy over a CPU model's own weight buffers; ``ortdecode.OnnxDecoder`` ('onnx') runs each step as
one ONNX Runtime graph, with float32 weights or, with ``quantize`` 'q8' / 'q4', 8-/4-bit weights
made once per checkpoint and cached (``model.quantize``); ``tfdecode.TFDecoder`` ('tf') runs over
the model's TensorFlow cache (what a GPU uses).  All give every sequence exactly the numbers it
would have alone, up to float rounding.

    dec = model.decoder(m, quantize="q4")   # OnnxDecoder over 4-bit weights
"""
from __future__ import annotations

from typing import Optional

from util.system import available_memory

from .rows import RowDecoder

ENGINES = ("auto", "numpy", "tf", "onnx")
#: Weight formats of ``quantize`` (None: float32).
QUANTIZE = ("q8", "q4")

#: The interface of every engine (``model.rows``).
Decoder = RowDecoder


def _onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def _room_for_a_copy(m) -> bool:
    """Whether the memory available now holds a second copy of ``m``'s float32 weights twice over
    (unknown: yes)."""
    have = available_memory()
    return have is None or have >= 2 * 4 * m.hparams.n_params


def choose_engine(m, engine: str = "auto", quantize: Optional[str] = None, rows: Optional[int] = None) -> str:
    """``engine`` ('auto', 'numpy', 'tf' or 'onnx') for model ``m``: 'auto' is tf on a GPU, onnx
    whenever ``quantize`` ('q8' or 'q4') is given, and on a CPU with float32 weights onnx (float32
    ONNX Runtime) -- measured faster than numpy at 1 row and at 8 on the three CPU families this has run on
    (docs/performance.md), at the cost of ONNX Runtime's own copy of the weights -- while the
    available memory holds that copy twice over; numpy (the reference engine) when it does not, or
    when onnxruntime is not installed.  ``rows`` (how many rows will be decoded at once) no longer
    changes the choice; it is accepted for the callers that pass it.

    A ``model.quantize.QuantizedModel`` decodes its own format (onnx).
    Raises ValueError for an unknown name, or for ``quantize`` with an engine other than onnx.
    """
    from .quantize import QuantizedModel

    if isinstance(m, QuantizedModel):
        if quantize not in (None, m.fmt):
            raise ValueError(f"this model holds {m.fmt} weights, not {quantize}")
        quantize = m.fmt
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise ValueError(f"unknown weight format {quantize!r}; one of {', '.join(QUANTIZE)}")
        if engine not in ("auto", "onnx"):
            raise ValueError(f"quantized weights ({quantize}) decode with the onnx engine, not {engine!r}")
        return "onnx"
    if engine == "tf" and not hasattr(m, "start"):
        raise ValueError("this model holds no TensorFlow weights (model.load_for_decoding): "
                         "load it with model.load for the tf engine")
    if engine == "auto":
        if "GPU" in str(getattr(m, "device", "")).upper():
            engine = "tf"
        elif _onnx_available() and _room_for_a_copy(m):
            engine = "onnx"
        else:
            engine = "numpy"
    if engine not in ENGINES[1:]:
        raise ValueError(f"unknown engine {engine!r}")
    return engine


def decoder(m, engine: str = "auto", quantize: Optional[str] = None, cache_root=None,
            rows: Optional[int] = None) -> RowDecoder:
    """A new decoder over model ``m``: ``NumpyDecoder`` ('numpy'; the default on a CPU),
    ``TFDecoder`` ('tf'; the default on a GPU) or ``OnnxDecoder`` ('onnx'; float32, or the
    ``quantize`` format 'q8' / 'q4', whose weights are cached beside the checkpoint or under
    ``cache_root``, see ``model.quantize``).  See ``choose_engine``."""
    chosen = choose_engine(m, engine, quantize, rows)
    quantize = quantize or getattr(m, "fmt", None)
    if chosen == "numpy":
        from .npdecode import NumpyDecoder
        return NumpyDecoder.from_model(m)
    if chosen == "onnx":
        from .ortdecode import OnnxDecoder
        return OnnxDecoder.from_model(m, quantize=quantize, cache_root=cache_root)
    from .tfdecode import TFDecoder
    return TFDecoder(m)
