"""The row table every decoding engine shares: sequences by id, their lengths, their slots.

    dec = model.decoder(m)                       # any engine: numpy, onnx (float32, q8, q4), tf
    logits = dec.add(["a", "b"], [[1, 2, 3], [4, 5]])   # two new sequences; logits [2, n_vocab]
    logits = dec.step(["a", "b"], [42, 7])       # one token each, at each sequence's own position
    dec.truncate("a", 2)                         # forget positions 2.. of "a" (llama.cpp's seq_rm)
    logits = dec.replace("b", [5, 7, 9])         # "b" now holds these tokens (a sliding window)
    dec.remove(["a"])                            # "a" leaves; its row is free for the next one
    kept = dec.park("b")                         # "b" leaves the steps, its cache kept aside ...
    dec.unpark("b", kept)                        # ... and is back, exactly as it was
    kept, logits = dec.prefill_aside([1, 2, 3])  # (engines with ``aside``) on any thread, beside steps
    dec.unpark("e", kept)                        # "e" joins, as ``add`` would have made it
    dec.length("b"), dec.ids, dec.rows

Sequences are addressed by any hashable id the caller chooses (llama.cpp's ``seq_id``); they join
and leave at any step, every one with its own length, and a step may feed any subset of them.  The
table checks every call (unknown or duplicate ids, empty or over-long sequences, token ids out of
range, a full context) and keeps the rows in slots 0..rows-1 (a row that leaves is replaced by a
row from the top: engines that run a step over a contiguous block of slots stay dense).  Identical
sequences added in one call are computed once and copied.

An engine implements only the network over slots:

    _prefill(slot, ids) -> logits [n_vocab]        slot is new and holds ids
    _step(slots, tokens, positions) -> [len, n_vocab]   one token each at its position
    _copy(src, dst)                                  dst becomes a copy of src's first length(src)
    _move(src, dst)                                  src's row now lives in dst (src is then free)
    _truncated(slot, length)                         (optional) a row was cut to ``length``
    _cleared()                                       (optional) every row is gone
    _save(slot) -> state                             (optional) what ``_load`` needs to put the row back
    _load(slot, state)                               (optional) slot is new and holds that row again

Lengths live here (``self._n``), not in the engines.
"""
from __future__ import annotations

import mmap
from typing import Dict, Hashable, Iterable, List, Sequence, Tuple

import numpy as np

from .hparams import HParams


def lazy_zeros(shape, dtype=np.float32) -> np.ndarray:
    """A zero-filled array whose memory is taken page by page as it is written (an anonymous
    mapping, with transparent huge pages off for it: numpy asks for huge pages on large arrays, and
    one written position in a 2 MB huge page would take all 2 MB).  Key/value caches are allocated
    at their full n_ctx this way: they never grow (no copies) and cost only what rows hold."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size == 0:
        return np.zeros(shape, dtype)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype).reshape(shape)


class RowDecoder:
    """Base class of the decoders: the row table and the checked public interface (see the module)."""

    #: "numpy", "onnx" or "tf".
    engine = ""
    #: The weight format: None (float32), "q8" or "q4".
    quantize = None
    #: Whether ``park`` saves what a row costs a step (an engine that would compute every row again
    #: on ``unpark`` says False: a scheduler then leaves held rows where they are).
    parking = True
    #: Whether ``prefill_aside`` is there: a new row's prefill on another thread while steps go on.
    aside = False

    def __init__(self, hparams: HParams):
        self.hparams = hparams
        self._slot: Dict[Hashable, int] = {}   # id -> slot, in the order the ids joined
        self._n = np.zeros(0, np.int64)        # length per slot
        #: Tokens run through prefills so far (identical sequences of one ``add`` count once).
        self.prefilled_tokens = 0

    # -- the table -----------------------------------------------------------------------------

    @property
    def ids(self) -> List[Hashable]:
        """The sequences held, in the order they joined."""
        return list(self._slot)

    @property
    def rows(self) -> int:
        return len(self._slot)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._slot

    def length(self, seq_id) -> int:
        """Tokens held for ``seq_id``."""
        return int(self._n[self._get(seq_id)])

    def lengths(self, ids: Iterable[Hashable] = None) -> List[int]:
        """Lengths of ``ids`` (default: every sequence, in join order)."""
        return [self.length(i) for i in (self._slot if ids is None else ids)]

    def _get(self, seq_id) -> int:
        try:
            return self._slot[seq_id]
        except KeyError:
            raise KeyError(f"no sequence {seq_id!r}") from None

    def _check_tokens(self, tokens: np.ndarray) -> None:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.hparams.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.hparams.n_vocab})")

    def _check_seq(self, seq) -> tuple:
        ids = tuple(int(t) for t in np.asarray(seq, dtype=np.int64).reshape(-1))
        if not ids:
            raise ValueError("a sequence needs at least one token")
        if len(ids) > self.hparams.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the context of {self.hparams.n_ctx}")
        self._check_tokens(np.asarray(ids))
        return ids

    def _ensure_slots(self, count: int) -> None:
        if self._n.shape[0] < count:
            grown = np.zeros(max(count, 2 * self._n.shape[0]), np.int64)
            grown[: self._n.shape[0]] = self._n
            self._n = grown

    # -- operations ----------------------------------------------------------------------------

    def add(self, ids: Sequence[Hashable], seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """New sequences ``ids`` holding ``seqs``; the logits after each [len(ids), n_vocab]."""
        ids = list(ids)
        if len(ids) != len(seqs):
            raise ValueError(f"{len(ids)} ids for {len(seqs)} sequences")
        if len(set(ids)) != len(ids) or any(i in self._slot for i in ids):
            raise ValueError("sequence ids must be new and distinct")
        checked = [self._check_seq(s) for s in seqs]
        first = self.rows
        self._ensure_slots(first + len(ids))
        self._reserve(first + len(ids), max((len(s) for s in checked), default=0) + 1)
        logits = np.empty((len(ids), self.hparams.n_vocab), np.float32)
        fresh: Dict[tuple, int] = {}   # sequence -> the slot it was computed in
        todo = []
        for j, (seq_id, seq) in enumerate(zip(ids, checked)):
            slot = first + j
            self._slot[seq_id] = slot
            self._n[slot] = len(seq)
            if seq not in fresh:
                fresh[seq] = slot
                todo.append((j, slot, seq))
        if todo:
            self.prefilled_tokens += sum(len(s) for _, _, s in todo)
            out = self._prefill_many([slot for _, slot, _ in todo], [s for _, _, s in todo])
            for (j, _, _), row in zip(todo, out):
                logits[j] = row
        for j, (seq_id, seq) in enumerate(zip(ids, checked)):
            src = fresh[seq]
            if src != first + j:
                self._copy(src, first + j)
                logits[j] = logits[src - first]
        return logits

    def step(self, ids: Sequence[Hashable], tokens) -> np.ndarray:
        """One token for each of ``ids`` (in that order); their logits [len(ids), n_vocab]."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        slots = np.array([self._get(i) for i in ids], np.int64)
        if tokens.shape[0] != slots.shape[0]:
            raise ValueError(f"{tokens.shape[0]} tokens for {slots.shape[0]} sequences")
        if slots.shape[0] == 0:
            return np.empty((0, self.hparams.n_vocab), np.float32)
        if len(set(slots.tolist())) != slots.shape[0]:
            raise ValueError("a sequence may take one token per step")
        self._check_tokens(tokens)
        positions = self._n[slots].copy()
        if positions.max() >= self.hparams.n_ctx:
            raise ValueError(f"the context of {self.hparams.n_ctx} tokens is full")
        self._reserve(self.rows, int(positions.max()) + 2)
        logits = self._step(slots, tokens, positions)
        self._n[slots] += 1
        return logits

    def truncate(self, seq_id, length: int) -> None:
        """Forget every position of ``seq_id`` from ``length`` on (ValueError past its end)."""
        slot = self._get(seq_id)
        if not 0 <= length <= self._n[slot]:
            raise ValueError(f"cannot cut sequence {seq_id!r} to {length} from {int(self._n[slot])}")
        self._n[slot] = length
        self._truncated(slot, length)

    def replace(self, seq_id, seq: Sequence[int]) -> np.ndarray:
        """``seq_id`` now holds ``seq`` (its old contents are forgotten); the logits after it [n_vocab]."""
        slot = self._get(seq_id)
        seq = self._check_seq(seq)
        self._reserve(self.rows, len(seq) + 1)
        self._n[slot] = len(seq)
        self.prefilled_tokens += len(seq)
        return self._prefill_many([slot], [seq])[0]

    def remove(self, ids: Iterable[Hashable]) -> None:
        """The sequences ``ids`` leave (their rows are reused)."""
        gone = {self._get(i) for i in ids}
        for seq_id in [i for i, s in self._slot.items() if s in gone]:
            del self._slot[seq_id]
        count = len(self._slot)
        holes = sorted(set(range(count)) - set(self._slot.values()))
        for seq_id, slot in self._slot.items():
            if slot >= count:  # keep slots 0..count-1 dense: move this row into a hole
                hole = holes.pop()
                self._move(slot, hole)
                self._n[hole] = self._n[slot]
                self._slot[seq_id] = hole

    def park(self, seq_id) -> "Parked":
        """``seq_id`` leaves the table, as ``remove`` (its row is free, steps no longer compute it), but its
        cache is kept aside: ``unpark(seq_id, parked)`` puts it back exactly as it was (a sequence whose
        reader is behind: a server's stream nobody reads)."""
        slot = self._get(seq_id)
        parked = Parked(int(self._n[slot]), self._save(slot))
        self.remove([seq_id])
        return parked

    def unpark(self, seq_id, parked: "Parked") -> None:
        """``seq_id`` (new) holds again what ``park`` kept; its next step goes on where it stopped."""
        if seq_id in self._slot:
            raise ValueError("sequence ids must be new and distinct")
        slot = self.rows
        self._ensure_slots(slot + 1)
        self._reserve(slot + 1, parked.length + 1)
        self._slot[seq_id] = slot
        self._n[slot] = parked.length
        self._load(slot, parked.state)

    def prefill_aside(self, seq: Sequence[int]) -> "Tuple[Parked, np.ndarray]":
        """A new row holding ``seq``, computed outside the table: (what ``unpark`` takes to make it a
        sequence, the logits after it [n_vocab]) -- the very numbers ``add`` gives.  It touches nothing of
        the table, so another thread may run it while this one steps (engines with ``aside`` only).
        ``prefilled_tokens`` does not count it: the caller that puts it in does."""
        seq = self._check_seq(seq)
        if not self.aside:
            raise NotImplementedError(f"the {self.engine} engine prefills only in its table")
        return self._prefill_aside(seq)

    def clear(self) -> None:
        """Forget every sequence."""
        self._slot = {}
        self._n = np.zeros(0, np.int64)
        self._cleared()

    # -- what an engine provides -----------------------------------------------------------------

    def _reserve(self, slots: int, positions: int) -> None:
        """Room for ``slots`` rows of up to ``positions`` positions (engines that preallocate)."""

    def _prefill_many(self, slots: Sequence[int], seqs: Sequence[tuple]) -> np.ndarray:
        return np.stack([self._prefill(slot, seq) for slot, seq in zip(slots, seqs)])

    def _prefill(self, slot: int, seq: tuple) -> np.ndarray:
        raise NotImplementedError

    def _step(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _copy(self, src: int, dst: int) -> None:
        raise NotImplementedError

    def _move(self, src: int, dst: int) -> None:
        self._copy(src, dst)

    def _truncated(self, slot: int, length: int) -> None:
        pass

    def _cleared(self) -> None:
        pass

    def _save(self, slot: int):
        raise NotImplementedError

    def _load(self, slot: int, state) -> None:
        raise NotImplementedError

    def _prefill_aside(self, seq: tuple):
        raise NotImplementedError


class Parked:
    """A row ``RowDecoder.park`` set aside: its length and the engine's copy of its cache."""

    __slots__ = ("length", "state")

    def __init__(self, length: int, state):
        self.length, self.state = length, state
