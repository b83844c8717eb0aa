"""Text generation: the original gpt2-generate.py's semantics, decoded incrementally.

    from model.generate import Generator, GenerateOptions
    gen = Generator(m, enc)
    texts = gen.generate("江戸時代の", num=3, options=GenerateOptions(top_k=20, seed=1))

What the original does, and this module with it:
- the context is encoded and only its last n_ctx/2 tokens are kept; an empty
  context means <|endoftext|>;
- tokens are drawn as ``model.sampling`` says;
- during the first ``min_length`` tokens <|endoftext|> is never drawn; then
  the original's sampler continues from its cache of the context *without
  its last token*, followed by the last token drawn (its second loop starts
  from the first loop's initial state), so the tokens drawn during the first
  min_length steps other than the last are not seen by the model afterwards.
  This is reproduced exactly, because the outputs must match the original's;
- a sample ends at <|endoftext|> (not part of the text) or once it has
  ``max_length`` characters, and is cut to max_length characters; a sample
  that ends empty is drawn again (the original does too), up to 8 times.

Where this module differs on purpose: the original generates n_ctx/2 tokens
at a time and, when a sample needs more, restarts from the last 256
characters of the generated text alone (forgetting the context).  Here the
model keeps a sliding window instead: when the window of n_ctx tokens is
full, decoding continues from the most recent n_ctx/2 tokens (context and
generated text together).  Results are identical until a sample passes
n_ctx/2 generated tokens.

Every sample has its own random stream: sample i of context j with seed s
draws from ``SeedSequence([s, j, i])``, so a sample does not depend on how
samples are batched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import numpy as np

from .errors import ModelError
from .sampling import SamplingParams, choose

RETRIES_FOR_EMPTY = 8


@dataclass(frozen=True)
class GenerateOptions:
    top_k: int = 40
    top_p: float = 0.0
    temperature: float = 1.0
    min_length: int = 0
    max_length: int = 500  # characters
    seed: Optional[int] = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.top_k, self.top_p, self.temperature, self.min_length)


class TextAssembler:
    """Token ids in, finished text out.

    Byte tokens (``<|byteN|>``) are held back until the character they
    belong to is complete (a non-byte token follows, or the sample ends), so
    the pieces returned concatenate to exactly ``encoder.decode(ids)``.
    """

    def __init__(self, enc):
        self.enc = enc
        self.byte_ids = frozenset(i for i, t in enumerate(enc.tokens) if t.startswith("<|byte") and t.endswith("|>"))
        self.pending: List[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        if token in self.byte_ids:
            self.pending.append(token)
            return ""
        piece = self.enc.decode(self.pending + [token])
        self.pending = []
        self.text += piece
        return piece

    def finish(self) -> str:
        piece = self.enc.decode(self.pending) if self.pending else ""
        self.pending = []
        self.text += piece
        return piece


class _NumpyEngine:
    def __init__(self, model):
        from .npdecode import NumpyDecoder, cpu_weights

        self.decoder = NumpyDecoder(model.hparams, cpu_weights(model))

    def start(self, ids):
        return self.decoder.start(ids)

    def step(self, ids):
        return self.decoder.step(ids)

    def rewind(self, length):
        self.decoder.rewind(length)

    def keep(self, rows):
        self.decoder.keep(rows)

    @property
    def length(self):
        return self.decoder.length


class _TFEngine:
    """The model's own TensorFlow cache (used on a GPU)."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.rows = None

    def start(self, ids):
        ids = np.asarray(ids)
        self.cache, logits = self.model.start(ids, max_len=self.model.hparams.n_ctx)
        self.rows = np.arange(ids.shape[0])
        return logits

    def step(self, ids):
        # Finished rows stay in the cache (dropping them would mean copying
        # it); they are fed a dummy token and their logits are ignored.
        full = np.zeros(self.cache.batch_size, dtype=np.int64)
        full[self.rows] = np.asarray(ids).reshape(-1)
        return self.model.step(self.cache, full)[self.rows]

    def rewind(self, length):
        self.cache.slot = int(length)

    def keep(self, rows):
        self.rows = self.rows[np.asarray(rows, dtype=np.int64)]

    @property
    def length(self):
        return self.cache.slot


@dataclass
class _Row:
    rng: np.random.Generator
    index: int
    assembler: TextAssembler
    done: bool = False
    on_text: Optional[Callable[[str], None]] = None
    emitted: int = 0


class Generator:
    """Generates samples with a loaded Model and Encoder.

    ``engine``: 'numpy' (decode steps with numpy, fastest on a CPU), 'tf'
    (the model's TensorFlow cache: what a GPU uses) or 'auto' (numpy on the
    CPU, tf on a GPU).
    """

    def __init__(self, model, enc, engine: str = "auto"):
        if engine == "auto":
            engine = "tf" if "GPU" in str(getattr(model, "device", "")).upper() else "numpy"
        if engine not in ("numpy", "tf"):
            raise ValueError(f"unknown engine {engine!r}")
        self.model = model
        self.enc = enc
        self.engine_name = engine
        self._engine = None

    def engine(self):
        if self._engine is None:
            self._engine = _NumpyEngine(self.model) if self.engine_name == "numpy" else _TFEngine(self.model)
        return self._engine

    def context_ids(self, context: str) -> List[int]:
        """The context's tokens as the original keeps them (the last n_ctx/2)."""
        if context == "":
            context = "<|endoftext|>"
        ids = self.enc.encode(context)
        if not ids:  # cannot happen with the real vocabulary; be safe
            ids = [self.enc.eos_id]
        return ids[-(self.model.hparams.n_ctx // 2):]

    def rngs(self, seed: Optional[int], context_index: int, count: int, first: int = 0):
        if seed is None:
            return [np.random.default_rng() for _ in range(count)]
        return [np.random.default_rng(np.random.SeedSequence([seed, context_index, i]))
                for i in range(first, first + count)]

    def generate(self, context: str, num: int = 1, options: GenerateOptions = GenerateOptions(),
                 context_index: int = 0, on_text: Optional[Callable[[int, str], None]] = None,
                 first: int = 0) -> List[str]:
        """``num`` samples for one context, computed as one batch.

        The samples are numbers ``first .. first+num-1`` of context number
        ``context_index`` (which fixes their random streams when a seed is
        set).  ``on_text(i, piece)`` (optional) receives each sample's text as
        it is produced (pieces concatenate to the final text).
        """
        if num < 1:
            raise ValueError("num must be at least 1")
        if options.max_length < 0:
            raise ValueError("max_length must not be negative")
        hp = self.model.hparams
        if options.min_length >= hp.n_ctx // 2:
            raise ModelError(f"--min_length must be below n_ctx/2 = {hp.n_ctx // 2}, got {options.min_length}")
        params = options.sampling()
        ids = self.context_ids(context)
        rngs = self.rngs(options.seed, context_index, num, first)
        texts: List[Optional[str]] = [None] * num
        todo = list(range(num))
        for attempt in range(RETRIES_FOR_EMPTY + 1):
            rows = [_Row(rngs[i], i, TextAssembler(self.enc),
                         on_text=(lambda piece, i=i: on_text(i, piece)) if on_text else None) for i in todo]
            for row in self._run(ids, rows, params, options.max_length):
                texts[row.index] = row.assembler.text[: options.max_length]
            todo = [i for i in todo if texts[i] == "" and options.max_length > 0]
            if not todo:
                break
        return [t or "" for t in texts]

    def _emit(self, row: _Row, piece: str, max_length: int):
        if row.on_text is None or not piece:
            return
        room = max_length - row.emitted
        if room > 0:
            piece = piece[:room]
            row.emitted += len(piece)
            row.on_text(piece)

    def _run(self, ids: List[int], rows: List[_Row], params: SamplingParams, max_length: int) -> Iterator[_Row]:
        """Decode a batch of samples of one context; yields rows as they finish."""
        hp = self.model.hparams
        eos = self.enc.eos_id
        engine = self.engine()
        active = list(rows)
        if max_length == 0:
            yield from active
            return
        window = [list(ids) for _ in active]  # what the model sees, per row
        logits = engine.start(np.array(window, dtype=np.int64))
        steps = 0
        while active:
            in_min = steps < params.min_length
            tokens = [choose(logits[b], params, row.rng, forbid=eos if in_min else None)
                      for b, row in enumerate(active)]
            steps += 1
            finished = []
            for b, (row, token) in enumerate(zip(active, tokens)):
                if token == eos and not in_min:
                    self._emit(row, row.assembler.finish(), max_length)
                    finished.append(b)
                    continue
                self._emit(row, row.assembler.push(token), max_length)
                if len(row.assembler.text) >= max_length:
                    finished.append(b)
            if finished:
                for b in finished:
                    active[b].done = True
                    yield active[b]
                keep = [b for b in range(len(active)) if b not in set(finished)]
                if not keep:
                    return
                active = [active[b] for b in keep]
                window = [window[b] for b in keep]
                tokens = [tokens[b] for b in keep]
                logits = None
                engine.keep(keep)
            if params.min_length and steps == params.min_length:
                # The original's second sampling loop starts from the cache
                # of the context without its last token, then feeds the last
                # token drawn.
                base = len(ids) - 1
                engine.rewind(base)
                window = [w[:base] + [t] for w, t in zip(window, tokens)]
            else:
                window = [w + [t] for w, t in zip(window, tokens)]
            if engine.length >= hp.n_ctx:
                # Sliding window: continue from the most recent n_ctx/2 tokens.
                window = [w[-(hp.n_ctx // 2):] for w in window]
                logits = engine.start(np.array(window, dtype=np.int64))
            else:
                logits = engine.step(np.array(tokens, dtype=np.int64))
