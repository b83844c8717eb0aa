"""Incremental decoding engines: one interface, three implementations, and the factory choosing one.

    import model
    dec = model.decoder(m)                  # numpy on the CPU, TensorFlow on a GPU ("auto")
    logits = dec.add([[1, 2, 3], [4, 5]])   # two rows: logits [2, n_vocab] after each
    logits = dec.step([42, 7])              # one more token per row
    dec.truncate([0], 2); dec.keep([1, 0])  # rewind row 0; reorder (or drop) rows

``npdecode.NumpyDecoder`` decodes with numpy over a CPU model's weight
buffers, every row with its own cache (rows join and leave at any step:
``joins_running`` True).  ``tfdecode.TFDecoder`` keeps rows over the model's
TensorFlow cache (``Model.start``/``Model.step``; what a GPU uses), whose rows
share one slot counter, so new rows join only when there are none.  Both
give every row exactly the numbers it would have alone.  ``ortdecode.OnnxDecoder``
(engine 'onnx') runs each step as one ONNX Runtime graph, with float32 weights
or, with ``quantize`` 'q8' / 'q4', 8-/4-bit weights made once per checkpoint
and cached (``model.quantize``); rows as NumpyDecoder's.

    dec = model.decoder(m, quantize="q4")   # OnnxDecoder over 4-bit weights
"""
from __future__ import annotations

from typing import List, Optional, Protocol, Sequence

import numpy as np

from util.system import available_memory

ENGINES = ("auto", "numpy", "tf", "onnx")
#: Weight formats of ``quantize`` (None: float32).
QUANTIZE = ("q8", "q4")


class Decoder(Protocol):
    """What both decoders offer.  Rows are numbered 0..rows-1 in the order they were added."""

    #: "numpy", "tf" or "onnx".
    engine: str
    #: Whether ``add`` may be called while there are rows (False: only when there are none).
    joins_running: bool

    @property
    def rows(self) -> int:
        """How many rows there are."""

    def add(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Append rows holding ``seqs`` (token id lists, any lengths); logits [len(seqs), n_vocab] after each."""

    def step(self, tokens, rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """Append one token to each of ``rows`` (default: every row, in order); their logits [len(rows), n_vocab]."""

    def feed(self, tokens, stepping: Sequence[int], restarting: Sequence[int],
             windows: Sequence[Sequence[int]]) -> np.ndarray:
        """Rows ``stepping`` take one token each (``tokens``, in that order), each row of ``restarting``
        is replaced by a row holding its window (``windows``, in that order); every row is in
        exactly one of the two lists.  Returns the logits that follow, for every row [rows, n_vocab]."""

    def truncate(self, rows: Sequence[int], length: int) -> None:
        """Forget every position from ``length`` on in each of ``rows`` (ValueError past a row's end)."""

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows``, renumbered in that order."""

    def lengths(self) -> List[int]:
        """Each row's length (tokens so far)."""

    def clear(self) -> None:
        """Forget every row."""


#: 'auto' on a CPU decodes float32 batches of this many rows or more with ONNX Runtime.
ONNX_ROWS = 4


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
    whenever ``quantize`` ('q8' or 'q4') is given, and on a CPU with float32 weights numpy -- or
    onnx (float32 ONNX Runtime, when installed) for ``rows`` >= ``ONNX_ROWS`` rows decoded at once:
    its small-batch matrix products are 2-3x OpenBLAS's, at the cost of a second (packed) copy of
    the weights in memory, so only while the available memory holds that copy twice over.

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
    if engine == "auto":
        if "GPU" in str(getattr(m, "device", "")).upper():
            engine = "tf"
        elif rows is not None and rows >= ONNX_ROWS and _onnx_available() and _room_for_a_copy(m):
            engine = "onnx"
        else:
            engine = "numpy"
    if engine not in ENGINES[1:]:
        raise ValueError(f"unknown engine {engine!r}")
    return engine


def decoder(m, engine: str = "auto", quantize: Optional[str] = None, cache_root=None,
            rows: Optional[int] = None) -> Decoder:
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
