"""Checking a batch of token id sequences before it reaches the network (numpy only)."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .errors import ModelError
from .hparams import HParams


def _row(r) -> np.ndarray:
    """One sequence of a batch as a 1-D array of integers (a list, tuple, array or other iterable of ints;
    bools count as ints, as in Python); ModelError for anything else."""
    try:
        a = np.asarray(r if isinstance(r, (list, tuple, np.ndarray)) else list(r))
    except (TypeError, ValueError, OverflowError):  # not iterable, ragged
        raise ModelError("token ids must be integers") from None
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ModelError("token ids must be integers")
    return a


def as_batch(ids, hparams: HParams, lengths=None, advice: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """(ids [B, T] int32 right-padded with 0, lengths [B] int32) from a batch, checked for ``hparams``.

    ``ids``: a list of id lists (unequal lengths are right-padded) or a 2-D
    integer array (or tensor); ``lengths`` optionally gives each row's real
    length in a padded array.  Every row needs at least one token, T is at
    most n_ctx, and every real token is in the vocabulary; positions past a
    row's length are set to 0.  Any problem is a ModelError;
    ``advice`` is added in parentheses to the error for a batch longer than
    n_ctx.
    """
    if isinstance(ids, np.ndarray) or hasattr(ids, "numpy"):
        arr = np.asarray(ids)
        if arr.ndim != 2:
            raise ModelError(f"expected a batch of token id sequences (2-D), got shape {list(arr.shape)}")
        rows = None
    else:
        rows = [_row(r) for r in ids]  # checked as arrays: no Python work per token
        if not rows:
            raise ModelError("empty batch")
        width = max(len(r) for r in rows)
        arr = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            arr[i, : len(r)] = r
    if arr.shape[0] == 0:
        raise ModelError("empty batch")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ModelError(f"token ids must be integers, got {arr.dtype}")
    if lengths is None:
        lens = np.array([len(r) for r in rows] if rows is not None else [arr.shape[1]] * arr.shape[0],
                        dtype=np.int64)
    else:
        lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if lens.shape[0] != arr.shape[0]:
            raise ModelError(f"{lens.shape[0]} lengths for a batch of {arr.shape[0]}")
    if (lens < 1).any():
        raise ModelError("every sequence needs at least one token")
    if (lens > arr.shape[1]).any():
        raise ModelError("a length is larger than the batch's width")
    if arr.shape[1] > hparams.n_ctx:
        raise ModelError(f"sequence of {arr.shape[1]} tokens is longer than the model's context of "
                         f"{hparams.n_ctx}" + (f" ({advice})" if advice else ""))
    valid = np.arange(arr.shape[1])[None, :] < lens[:, None]
    bad = valid & ((arr < 0) | (arr >= hparams.n_vocab))
    if bad.any():
        raise ModelError(f"token id {int(arr[bad][0])} is outside the vocabulary (0..{hparams.n_vocab - 1})")
    arr = np.where(valid, arr, 0)
    return arr.astype(np.int32), lens.astype(np.int32)
