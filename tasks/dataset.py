"""Fine-tuning data: text files -> token arrays -> .npz (the original's format) -> chunks.

The original ``encode_bpe.py`` writes ``np.savez_compressed(dst, *arrays)``:
an .npz whose members ``arr_0``, ``arr_1``, ... are 1-D integer token arrays,
each the encoding of several documents joined, every document followed by
``<|endoftext|>``.  ``run_finetune.py`` reads every member and cuts it into
training chunks: a chunk ends after ``<|endoftext|>`` or when it reaches
``n_ctx`` tokens; chunks of a single token are dropped.  This module reads and
writes exactly that, and cuts chunks the same way.

    paths = find_texts("corpus/")                       # *.txt, recursively, sorted
    arrays = encode_files(paths, enc, processes=4)       # list of uint16/int32 arrays
    save_npz("data.npz", arrays)                         # written atomically
    data = Chunks.from_arrays(load_npz("data.npz"), 1024, enc.eos_id)
    batch, lengths = data.batch(indices)                 # [B, 1024] int32, padded with eos

No TensorFlow here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np

from util.files import atomic_write

from .errors import DatasetError

__all__ = ["COMBINE", "DatasetError", "find_texts", "read_text", "encode_files", "make_dataset", "save_npz", "load_npz", "check_ids", "Chunks",
           "Sampler"]

COMBINE = 50000  # characters of text per .npz member, as the original's --combine default




# --------------------------------------------------------------------------- text files

def find_texts(src: str | os.PathLike) -> List[Path]:
    """The .txt files under ``src`` (recursively, sorted), or ``[src]`` for one file."""
    path = Path(src)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"no such file or directory: {src}")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DatasetError(f"no .txt files under {src}")
    return files


def read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: invalid UTF-8 at byte offset {e.start}") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None


_WORKER_ENC = None


def _encode_document(job):
    path, clean = job
    enc = _WORKER_ENC
    ids = enc.encode(read_text(Path(path)), clean=clean)
    ids.append(enc.eos_id)
    return np.asarray(ids, dtype=_dtype(len(enc)))


def _ignore_sigint() -> None:
    """Worker set-up: Ctrl-C is the parent's to handle; SIGTERM (the pool stopping) ends a worker plainly."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _dtype(n_vocab: int):
    return np.uint16 if n_vocab <= 65536 else np.int32


def encode_files(paths: Sequence[Path], enc, clean: bool = False, processes: int = 1,
                 combine: int = COMBINE, progress: Optional[Callable] = None) -> List[np.ndarray]:
    """Encode each file as one document followed by ``<|endoftext|>``; consecutive
    documents are joined into arrays of at least ``combine`` characters of text
    (as the original groups them).  ``processes`` > 1 encodes in worker processes
    (fork).  ``progress(iterable, total)`` may wrap the per-file iteration."""
    global _WORKER_ENC
    _WORKER_ENC = enc
    jobs = [(str(p), clean) for p in paths]
    sizes = []
    for p in paths:
        try:
            sizes.append(os.path.getsize(p))
        except OSError as e:
            raise DatasetError(f"cannot read {p}: {e.strerror or e}") from None
    wrap = progress or (lambda it, total: it)
    pool = None
    if processes > 1 and len(jobs) > 1:
        import multiprocessing
        # Workers ignore Ctrl-C: the parent alone sees it, stops the pool and ends quietly.
        pool = multiprocessing.get_context("fork").Pool(min(processes, len(jobs)), initializer=_ignore_sigint)
        results = pool.imap(_encode_document, jobs, chunksize=max(1, len(jobs) // (8 * processes)))
    else:
        results = map(_encode_document, jobs)
    arrays, pending, chars = [], [], 0
    try:
        for size, ids in wrap(zip(sizes, results), len(jobs)):
            pending.append(ids)
            chars += size // 3 + 1  # about the characters of UTF-8 Japanese text
            if chars >= combine:
                arrays.append(np.concatenate(pending))
                pending, chars = [], 0
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if pending:
        arrays.append(np.concatenate(pending))
    if sum(len(a) for a in arrays) <= len(jobs):  # nothing but <|endoftext|>s
        raise DatasetError("the dataset is empty (the .txt files hold no text)")
    return arrays


# --------------------------------------------------------------------------- .npz

def make_dataset(src, dst: str, enc, clean: bool = False, processes: int = 1, combine: int = COMBINE,
                 progress: Optional[Callable] = None):
    """What gpt2-encode.py does: encode the .txt files under ``src`` and save them
    as the .npz ``dst`` (".npz" added when missing, as numpy does).  Returns
    (files, tokens, path written)."""
    dst = str(dst)
    if not dst.endswith(".npz"):
        dst += ".npz"
    paths = find_texts(src)
    arrays = encode_files(paths, enc, clean=clean, processes=processes, combine=combine, progress=progress)
    save_npz(dst, arrays)
    return len(paths), int(sum(len(a) for a in arrays)), dst


def save_npz(path: str | os.PathLike, arrays: Sequence[np.ndarray]) -> None:
    """``np.savez_compressed(path, *arrays)``, written atomically (``util.files``)."""
    try:
        atomic_write(path, lambda f: np.savez_compressed(f, *arrays))
    except OSError as e:
        raise DatasetError(f"cannot write {path}: {e.strerror or e}") from None


def load_npz(path: str | os.PathLike) -> List[np.ndarray]:
    """The token arrays of an .npz in the original's format (members in arr_N order)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = sorted(npz.files, key=lambda n: (len(n), n))
            arrays = [np.asarray(npz[n]).reshape(-1) for n in names]
    except FileNotFoundError:
        raise DatasetError(f"no such dataset: {path}") from None
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError...
        raise DatasetError(f"{path} is not a readable .npz dataset: {e}") from None
    for a in arrays:
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise DatasetError(f"{path}: token arrays must be integers, found {a.dtype}")
    if sum(a.size for a in arrays) == 0:
        raise DatasetError(f"{path}: the dataset is empty")
    return arrays


def check_ids(arrays: Sequence[np.ndarray], n_vocab: int) -> None:
    """DatasetError unless every token id is in 0..n_vocab-1 (a dataset made for another vocabulary)."""
    present = [a for a in arrays if a.size]
    low = min(int(a.min()) for a in present)
    high = max(int(a.max()) for a in present)
    if low < 0 or high >= n_vocab:
        bad = low if low < 0 else high
        raise DatasetError(f"the dataset has token id {bad}, outside the model's vocabulary (0..{n_vocab - 1})")


# --------------------------------------------------------------------------- chunks

class Chunks:
    """Training chunks over one flat token array: ``starts[i]``, ``lengths[i]``."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n_ctx: int, pad_id: int):
        self.tokens, self.starts, self.lengths = tokens, starts, lengths
        self.n_ctx, self.pad_id = n_ctx, pad_id

    @classmethod
    def from_arrays(cls, arrays: Iterable[np.ndarray], n_ctx: int, eos_id: int) -> "Chunks":
        """Cut as the original does: a chunk ends after eos or at n_ctx tokens; 1-token chunks are dropped."""
        arrays = [np.asarray(a).reshape(-1).astype(np.int32) for a in arrays]
        tokens = np.concatenate(arrays) if arrays else np.zeros([0], np.int32)
        starts, lengths = [], []
        offset = 0
        for a in arrays:
            ends = np.flatnonzero(a == eos_id) + 1
            bounds = np.concatenate([[0], ends, [len(a)]]) if len(a) else np.zeros([1], np.int64)
            for s, e in zip(bounds[:-1], bounds[1:]):
                for cs in range(int(s), int(e), n_ctx):
                    length = min(n_ctx, int(e) - cs)
                    if length > 1:
                        starts.append(offset + cs)
                        lengths.append(length)
            offset += len(a)
        if not starts:
            raise DatasetError("the dataset has no chunk of two or more tokens")
        return cls(tokens, np.asarray(starts, np.int64), np.asarray(lengths, np.int32), n_ctx, eos_id)

    def __len__(self) -> int:
        return len(self.starts)

    def subset(self, indices) -> "Chunks":
        indices = np.asarray(indices, np.int64)
        return Chunks(self.tokens, self.starts[indices], self.lengths[indices], self.n_ctx, self.pad_id)

    def split(self, fraction: float, seed: int = 0):
        """(train, validation): a random ``fraction`` of the chunks (at least one) held out."""
        if fraction <= 0:
            return self, None
        n_val = max(1, int(round(len(self) * fraction)))
        if n_val >= len(self):
            raise DatasetError(f"--val_fraction {fraction} leaves no training chunk ({len(self)} chunks in all)")
        order = np.random.default_rng([int(seed), 7]).permutation(len(self))
        return self.subset(np.sort(order[n_val:])), self.subset(np.sort(order[:n_val]))

    def batch(self, indices) -> tuple:
        """(ids [B, n_ctx] int32 padded with pad_id, lengths [B] int32)."""
        out = np.full((len(indices), self.n_ctx), self.pad_id, np.int32)
        lens = np.empty(len(indices), np.int32)
        for row, i in enumerate(indices):
            s, n = self.starts[i], self.lengths[i]
            out[row, :n] = self.tokens[s:s + n]
            lens[row] = n
        return out, lens

    def n_tokens(self) -> int:
        return int(self.lengths.sum())


class Sampler:
    """Chunk indices in a fresh random order each epoch, reproducible from (seed, position):
    draw k is ``permutation(seed, k // N)[k % N]``, so a resumed run continues the sequence."""

    def __init__(self, n: int, seed: int = 0, position: int = 0):
        self.n, self.seed, self.position = n, int(seed), int(position)
        self._epoch, self._perm = -1, None

    def next(self, count: int) -> np.ndarray:
        out = np.empty(count, np.int64)
        for j in range(count):
            epoch, k = divmod(self.position, self.n)
            if epoch != self._epoch:
                self._epoch = epoch
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out[j] = self._perm[k]
            self.position += 1
        return out

    @property
    def epoch(self) -> float:
        return self.position / self.n
