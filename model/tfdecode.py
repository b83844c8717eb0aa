"""The TensorFlow engine of the row table (what a GPU uses): rows over ``Model.start`` / ``Model.step``.

The model's TensorFlow cache gives every row of a batch one shared slot counter (a shorter
prompt is preceded by masked padding), so it cannot let rows diverge.  This engine keeps every
row's tokens and, whenever the cache no longer matches them (a row joined, was cut or restarted,
only some rows step, or the cache is full while a row still has room), prefills every row again
from its own tokens: each row then holds exactly what it would hold alone.  Callers see the same
interface as every engine (``model.rows``); on a CPU the numpy and ONNX Runtime engines are faster.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from .rows import RowDecoder


class TFDecoder(RowDecoder):
    """Sequences decoded together over one ``Model``'s TensorFlow cache (see the module)."""

    engine = "tf"
    #: one cache for the whole batch: a row put back would be prefilled again with every other row
    parking = False

    def __init__(self, model):
        super().__init__(model.hparams)
        self.model = model
        self._cleared()

    def _cleared(self) -> None:
        self.cache = None
        self.seqs: List[Optional[List[int]]] = []   # by slot: the tokens the row holds
        self.live = np.zeros(0, np.int64)          # by slot: the row in the cache (-1: not in it)

    def _reserve(self, slots: int, positions: int) -> None:
        if len(self.seqs) < slots:
            self.seqs += [None] * (slots - len(self.seqs))
            self.live = np.concatenate([self.live, np.full(slots - self.live.shape[0], -1, np.int64)])

    def _refill(self) -> np.ndarray:
        """A new cache holding every row's tokens; the logits after each row [rows, n_vocab]
        (rows the table has not filled yet -- copies made right after -- stay out of the cache)."""
        filled = [slot for slot in range(self.rows) if self.seqs[slot] is not None]
        self.cache, out = self.model.start([self.seqs[s] for s in filled], max_len=self.hparams.n_ctx)
        self.live[:] = -1
        self.live[filled] = np.arange(len(filled))
        logits = np.zeros((self.rows, self.hparams.n_vocab), np.float32)
        logits[filled] = out
        return logits

    def _prefill_many(self, slots, seqs) -> np.ndarray:
        for slot, seq in zip(slots, seqs):
            self.seqs[slot] = list(seq)
        return self._refill()[list(slots)]

    def _copy(self, src: int, dst: int) -> None:
        self.seqs[dst] = list(self.seqs[src])
        self.live[dst] = -1  # not in the cache: the next step prefills again

    def _move(self, src: int, dst: int) -> None:
        self.seqs[dst], self.seqs[src] = self.seqs[src], None
        self.live[dst], self.live[src] = self.live[src], -1

    def _truncated(self, slot: int, length: int) -> None:
        del self.seqs[slot][length:]

    def _save(self, slot: int):
        return list(self.seqs[slot])

    def _load(self, slot: int, state) -> None:
        self.seqs[slot] = list(state)
        self.live[slot] = -1  # not in the cache: the next step prefills again

    def _in_sync(self) -> bool:
        """Whether every row sits in the cache and all of them end at one slot with room for a step."""
        rows = self.rows
        if self.cache is None or (self.live[:rows] < 0).any():
            return False
        ends = {int(self.cache.offsets[self.live[b]]) + len(self.seqs[b]) for b in range(rows)}
        if len(ends) != 1:
            return False
        self.cache.slot = ends.pop()  # after a cut every row may end earlier than the cache's counter
        return self.cache.room > 0

    def _step(self, slots, tokens, positions) -> np.ndarray:
        rows = self.rows
        every_row = slots.shape[0] == rows
        if every_row and self._in_sync():
            full = np.zeros(self.cache.batch_size, dtype=np.int64)
            full[self.live[slots]] = tokens
            for slot, t in zip(slots, tokens):
                self.seqs[slot].append(int(t))
            return self.model.step(self.cache, full)[self.live[slots]]
        for slot, t in zip(slots, tokens):
            self.seqs[slot].append(int(t))
        return self._refill()[slots]
