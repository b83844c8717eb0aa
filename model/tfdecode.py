"""Row bookkeeping for incremental decoding over the model's TensorFlow cache (what a GPU uses).

``TFDecoder`` offers the interface of ``npdecode.NumpyDecoder`` (see
``model.decoding``) on top of ``Model.start`` / ``Model.step``.  The TF
cache's rows share one slot counter (a shorter prompt is preceded by masked
padding slots), so rows join only together: ``add`` takes new rows only
when there are none, and ``joins_running`` is False.  The decoder keeps
every row's tokens, so that when rows diverge (one row restarts from a new
window, rows rewind to different lengths, a subset of rows steps, or the
cache is full while a row still has room) it prefills every row again from
its own tokens: each row then holds exactly what it would hold alone.  Rows
dropped by ``keep`` stay in the cache (dropping them would mean copying
it); they are fed a dummy token and their logits are ignored.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np


class TFDecoder:
    """A batch of sequences decoded together over one ``Model``'s TF cache.

    Methods as ``NumpyDecoder``'s: ``add``, ``step``, ``feed``, ``truncate``,
    ``keep``, ``lengths``, ``clear``, ``rows``; ``joins_running`` is False.
    """

    engine = "tf"
    joins_running = False  # rows join only when there are none

    def __init__(self, model):
        self.model = model
        self.hparams = model.hparams
        self.clear()

    # -- rows -------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.seqs)

    def lengths(self) -> List[int]:
        return [len(s) for s in self.seqs]

    def clear(self) -> None:
        self.cache = None
        self.live = np.zeros(0, dtype=np.int64)  # each row's row in the cache
        self.seqs: List[List[int]] = []

    def keep(self, rows) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self.live = self.live[rows]
        self.seqs = [self.seqs[r] for r in rows]

    def truncate(self, rows, length: int) -> None:
        for r in rows:
            if not 0 <= length <= len(self.seqs[int(r)]):
                raise ValueError(f"cannot rewind row {r} to {length} from {len(self.seqs[int(r)])}")
            del self.seqs[int(r)][length:]

    # -- prefill and steps ------------------------------------------------------------------

    def _prefill(self) -> np.ndarray:
        """A new cache holding every row's tokens; logits after each."""
        self.cache, logits = self.model.start(self.seqs, max_len=self.model.hparams.n_ctx)
        self.live = np.arange(len(self.seqs))
        return logits

    def add(self, seqs) -> np.ndarray:
        """Rows holding ``seqs`` (only while there are no rows); logits [len(seqs), n_vocab] after each."""
        if self.seqs:
            raise ValueError("the TensorFlow engine takes new rows only when it has none")
        self.seqs = [[int(t) for t in np.asarray(s).reshape(-1)] for s in seqs]
        return self._prefill()

    def step(self, tokens, rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """One token for each of ``rows`` (default all, in order); logits [len(rows), n_vocab].

        Stepping only some rows makes the rows diverge: every row is then prefilled again.
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if rows is not None and [int(r) for r in rows] != list(range(self.rows)):
            rows = [int(r) for r in rows]
            if len(rows) != tokens.shape[0]:
                raise ValueError(f"{tokens.shape[0]} tokens for {len(rows)} rows")
            for r, t in zip(rows, tokens):
                self.seqs[r].append(int(t))
            return self._prefill()[rows]
        if tokens.shape[0] != self.rows:
            raise ValueError(f"{tokens.shape[0]} tokens for {self.rows} rows")
        self._sync()
        full = np.zeros(self.cache.batch_size, dtype=np.int64)
        full[self.live] = tokens
        for seq, t in zip(self.seqs, tokens):
            seq.append(int(t))
        return self.model.step(self.cache, full)[self.live]

    def feed(self, tokens, stepping, restarting, windows) -> np.ndarray:
        """Rows ``stepping`` take one token each (``tokens``), rows ``restarting`` restart from
        their ``windows``; the logits that follow, for every row.  A restart prefills every row again."""
        if not restarting:
            return self.step(tokens)
        for r, t in zip(stepping, tokens):
            self.seqs[r].append(int(t))
        for r, window in zip(restarting, windows):
            self.seqs[r] = [int(t) for t in window]
        return self._prefill()

    def _sync(self) -> None:
        """Make the cache match the rows' tokens before a step."""
        slots = {int(self.cache.offsets[self.live[b]]) + len(s) for b, s in enumerate(self.seqs)}
        if len(slots) == 1:
            self.cache.slot = slots.pop()  # every row ends at the same slot (after a rewind, say)
            if self.cache.room > 0:
                return
        # Rows at different slots, or a full cache with room left in the rows.
        self._prefill()
