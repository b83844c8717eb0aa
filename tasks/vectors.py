"""Sentence vectors: hidden states pooled over a text's tokens.

    from tasks.vectors import Vectorizer
    vec = Vectorizer(m, enc, pooling="last", layer=-1, normalize=False)
    for index, vector in vec.vectors(["今日は", "明日も晴れるかな"]): ...
    vec = Vectorizer(m, enc, precision="bf16")   # bfloat16 block matrices (vec.model)

``last`` pooling of the final layer-normed state is the original
gpt2-transform.py's vector (its ``h_flat[-1]``).  Texts are batched with the
least padding (``tasks.batching.plan``; right padding changes a vector only by
float rounding, about 1e-6: attention is causal), and results come back in
input order.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from model import PRECISIONS

from . import batching
from .errors import OptionError

POOLINGS = ("last", "mean")


def in_precision(model, precision: Optional[str]):
    """``model`` computing its forward passes in ``precision`` ('fp32' or 'bf16'; None: as it
    is): the model itself, or its ``with_precision`` copy (bfloat16 block matrices, cast
    once).  OptionError for another value."""
    if precision is None:
        return model
    if precision not in PRECISIONS:
        raise OptionError("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if getattr(model, "precision", precision) == precision:  # (a stand-in with hparams only: checks)
        return model
    return model.with_precision(precision)


class Vectorizer:
    def __init__(self, model, enc, pooling: str = "last", layer: int = -1, normalize: bool = False,
                 max_tokens: int = 4096, max_batch: int = 64, precision: Optional[str] = None):
        """``precision``: 'fp32' or 'bf16' for the forward passes (None: the model's own,
        ``model.precision``); ``self.model`` is the model that computes them."""
        if pooling not in POOLINGS:
            raise OptionError("pooling", f"must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        n_layer = model.hparams.n_layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -1 <= layer < n_layer:
            raise OptionError("layer", f"must be -1 (final) or 0..{n_layer - 1} for this model, got {layer!r}")
        self.model = in_precision(model, precision)
        self.enc = enc
        self.pooling = pooling
        self.layer = layer
        self.normalize = normalize
        self.max_tokens = max_tokens
        self.max_batch = max_batch

    def ids(self, text: str) -> Tuple[List[int], bool]:
        """(token ids, truncated): an empty text is <|endoftext|>; a text
        longer than n_ctx keeps its last n_ctx tokens."""
        ids = self.enc.encode(text) if text else []
        if not ids:
            ids = [self.enc.eos_id]
        n_ctx = self.model.hparams.n_ctx
        if len(ids) > n_ctx:
            return ids[-n_ctx:], True
        return ids, False

    def _pool(self, hidden: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
        if self.pooling == "last":
            out = hidden[np.arange(len(lengths)), np.asarray(lengths) - 1]
        else:
            mask = np.arange(hidden.shape[1])[None, :] < np.asarray(lengths)[:, None]
            out = (hidden * mask[..., None]).sum(axis=1) / np.asarray(lengths, np.float32)[:, None]
        out = out.astype(np.float32)
        if self.normalize:
            norm = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.where(norm > 0, norm, 1.0)
        return out

    def batch_vectors(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors [len(batch), n_embd] of id sequences (lists or integer arrays), computed as one padded
        batch."""
        lengths = [len(ids) for ids in batch]
        hidden = self.model.hidden(list(batch), layer=self.layer)
        return self._pool(hidden, lengths)

    def vectors_of_ids(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors of many id lists, batched with the least padding (``tasks.batching``), in input order."""
        out = np.empty((len(id_lists), self.model.hparams.n_embd), np.float32)
        for rows in self._plan([len(ids) for ids in id_lists]):
            out[rows] = self.batch_vectors([id_lists[i] for i in rows])
        return out

    def _plan(self, lengths: Sequence[int]) -> List[List[int]]:
        """Batches of row indices with the least padding, each at most max_tokens padded
        tokens (or one row) and max_batch rows (``tasks.batching.plan``)."""
        return batching.plan(lengths, self.max_tokens, self.max_batch)

    def vectors(self, texts: Iterable[str]) -> Iterator[Tuple[int, np.ndarray]]:
        """(index, vector) for each text, in order."""
        texts = list(texts)
        id_lists = [self.ids(t)[0] for t in texts]
        for i, v in enumerate(self.vectors_of_ids(id_lists)):
            yield i, v
