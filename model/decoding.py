"""Incremental decoding engines: one interface, two implementations, and the factory choosing one.

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
give every row exactly the numbers it would have alone.
"""
from __future__ import annotations

from typing import List, Optional, Protocol, Sequence

import numpy as np

ENGINES = ("auto", "numpy", "tf")


class Decoder(Protocol):
    """What both decoders offer.  Rows are numbered 0..rows-1 in the order they were added."""

    #: "numpy" or "tf".
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


def choose_engine(m, engine: str = "auto") -> str:
    """``engine`` ('auto', 'numpy' or 'tf') for model ``m``: 'auto' is numpy on a CPU, tf on a GPU.

    Raises ValueError for an unknown name.
    """
    if engine == "auto":
        engine = "tf" if "GPU" in str(getattr(m, "device", "")).upper() else "numpy"
    if engine not in ENGINES[1:]:
        raise ValueError(f"unknown engine {engine!r}")
    return engine


def decoder(m, engine: str = "auto") -> Decoder:
    """A new decoder over model ``m``: ``NumpyDecoder`` ('numpy'; the default on a CPU) or
    ``TFDecoder`` ('tf'; the default on a GPU).  See ``choose_engine``."""
    if choose_engine(m, engine) == "numpy":
        from .npdecode import NumpyDecoder
        return NumpyDecoder.from_model(m)
    from .tfdecode import TFDecoder
    return TFDecoder(m)
