"""Text generation: the original gpt2-generate.py's semantics, decoded incrementally.

    from tasks.generate import Generator, GenerateOptions
    gen = Generator(m, enc)
    texts = gen.generate("江戸時代の", num=3, options=GenerateOptions(top_k=20, seed=1))
    for s in gen.generate_many(["今日は", "明日は"], num=2, options=GenerateOptions(seed=1)):
        print(s.context_index, s.index, s.text)

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
model keeps a sliding window instead: when a sample's window of n_ctx tokens
is full, decoding continues from its most recent n_ctx/2 tokens (context and
generated text together).  Results are identical until a sample passes
n_ctx/2 generated tokens.

Batching: ``generate_many`` decodes up to ``batch_size`` samples together,
from as many contexts as it takes, over a decoder of ``model.decoding``.
With the numpy engine every sample is a
row with its own cache and length (``npdecode``): rows of different contexts
share a batch, a finished row's place goes to the next sample at once, and
each row rewinds and slides its window on its own, exactly as it would
alone.  The TensorFlow engine's rows share one cache slot counter, so its
rows join only together (a batch of samples of several contexts, the next
batch when all are done); each row still ends up with exactly the numbers
it would have alone.  Every sample has its own random
stream: sample i of context j with seed s draws from
``SeedSequence([s, j, i])``, so a sample does not depend on how samples are
batched.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from model import choose_engine, decoder as new_decoder

from . import memory
from .errors import OptionError
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
    max_tokens: Optional[int] = None  # tokens per sample at most (None: no limit)
    stop: Tuple[str, ...] = ()  # a sample ends before the first occurrence of any of these

    def __post_init__(self):
        self.sampling()  # validates top_k, top_p, temperature, min_length
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, (int, np.integer)) \
                or self.max_length < 0:
            raise OptionError("max_length", f"must not be negative, got {self.max_length!r}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool)
                                            or not isinstance(self.max_tokens, (int, np.integer))
                                            or self.max_tokens < 0):
            raise OptionError("max_tokens", f"must not be negative, got {self.max_tokens!r}")
        if isinstance(self.stop, str) or not all(isinstance(x, str) and x for x in self.stop):
            raise OptionError("stop", f"must be a sequence of non-empty strings, got {self.stop!r}")

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.top_k, self.top_p, self.temperature, self.min_length)


@dataclass
class GenerationStats:
    """What a Generator has done so far (for --verbose and benchmarks)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    tokens: int = 0           # tokens drawn
    decode_seconds: float = 0.0

    def line(self) -> str:
        def rate(n, s):
            return f"{n / s:.1f} tokens/s" if s > 0 else "-"
        return (f"prefill: {self.prefill_tokens} tokens in {self.prefill_seconds:.2f} s "
                f"({rate(self.prefill_tokens, self.prefill_seconds)}); decoding: {self.tokens} tokens in "
                f"{self.decode_seconds:.2f} s ({rate(self.tokens, self.decode_seconds)})")


def cut_at_stop(text: str, stop: Sequence[str]) -> Tuple[str, bool]:
    """``text`` up to the first occurrence of any of ``stop``; (text, whether a stop string was found)."""
    first = -1
    for s in stop:
        if s:
            i = text.find(s)
            if i >= 0 and (first < 0 or i < first):
                first = i
    return (text, False) if first < 0 else (text[:first], True)


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` may still become the start of a stop string."""
    held = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


class TextAssembler:
    """Token ids in, finished text out.

    Byte tokens (``<|byteN|>``) are held back until the character they
    belong to is complete (a non-byte token follows, or the sample ends), so
    the pieces returned concatenate to exactly ``encoder.decode(ids)``.
    """

    def __init__(self, enc):
        self.enc = enc
        self.byte_ids = enc.byte_ids
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


@dataclass(frozen=True)
class Sample:
    """One generated sample: sample ``index`` of context number ``context_index``."""

    context_index: int
    context: str
    index: int
    text: str


@dataclass
class _Job:
    context_index: int
    context: str
    index: int
    ids: List[int]
    rng: np.random.Generator
    on_text: Optional[Callable[[str], None]] = None
    attempt: int = 0
    order: int = 0


@dataclass
class _SampleInProgress:
    """A sample being decoded: one decoder row."""

    job: _Job
    assembler: TextAssembler
    window: List[int]  # what the model sees
    steps: int = 0
    emitted: int = 0


class Generator:
    """Generates samples with a loaded Model and Encoder.

    ``engine``: 'numpy' (decode steps with numpy, fastest on a CPU), 'tf'
    (the model's TensorFlow cache: what a GPU uses) or 'auto' (numpy on the
    CPU, tf on a GPU); see ``model.decoder``.  ``decoder``: a decoder
    (``model.decoding.Decoder``) to use instead of a new one; ``engine`` is
    then its ``engine``.  ``quantize``: 'q8' or 'q4' decodes with 8-/4-bit weights (engine 'onnx',
    ``model.ortdecode``; the weights are made on first use and cached, see ``model.quantize``);
    None (the default) keeps float32 weights.

    With 'auto' on a CPU and float32 weights, the engine also depends on how many samples the
    first generation decodes at once (``model.choose_engine``'s ``rows``: float32 ONNX Runtime
    from ``model.decoding.ONNX_ROWS`` on, else numpy); it is chosen when first needed
    (``engine(rows)``) and kept.
    """

    def __init__(self, model, enc, engine: str = "auto", decoder=None, quantize: Optional[str] = None):
        self.model = model
        self.enc = enc
        self.quantize = decoder.quantize if decoder is not None and hasattr(decoder, "quantize") else quantize
        self.engine_name = decoder.engine if decoder is not None else choose_engine(model, engine, quantize)
        self._asked = engine
        self._decoder = decoder
        self.stats = GenerationStats()

    def engine(self, rows: Optional[int] = None):
        """The decoder (made on first use and kept: every generation reuses it).  ``rows``: how many
        samples the first generation decodes at once (see ``model.choose_engine``)."""
        if self._decoder is None:
            self.engine_name = choose_engine(self.model, self._asked, self.quantize, rows)
            self._decoder = new_decoder(self.model, self.engine_name, quantize=self.quantize)
        return self._decoder

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

    def _check(self, num: int, options: "GenerateOptions", rows: int) -> None:
        """Checks that need the model: min_length, and memory for ``rows`` samples decoded together."""
        if num < 1:
            raise ValueError("num must be at least 1")
        hp = self.model.hparams
        half = hp.n_ctx // 2
        if options.min_length >= half:
            raise OptionError("min_length", f"must be below n_ctx/2 = {half}, got {options.min_length}")
        # Each sample decoded at once holds keys and values of up to n_ctx tokens.
        per_row = 2 * 4 * hp.n_layer * hp.n_ctx * hp.n_embd
        memory.check("batch_size", rows, rows * per_row, f"the key/value caches of {rows} samples decoded together")

    def _jobs(self, context_index: int, context: str, num: int, seed: Optional[int], first: int = 0,
              on_text: Optional[Callable[[int, str], None]] = None) -> List[_Job]:
        ids = self.context_ids(context)
        return [_Job(context_index, context, first + i, ids, rng,
                     on_text=(lambda piece, i=first + i: on_text(i, piece)) if on_text else None)
                for i, rng in enumerate(self.rngs(seed, context_index, num, first))]

    def generate(self, context: str, num: int = 1, options: GenerateOptions = GenerateOptions(),
                 context_index: int = 0, on_text: Optional[Callable[[int, str], None]] = None,
                 first: int = 0, batch_size: Optional[int] = None,
                 progress: Optional[Callable[[int], None]] = None) -> List[str]:
        """``num`` samples for one context (by default computed as one batch).

        The samples are numbers ``first .. first+num-1`` of context number
        ``context_index`` (which fixes their random streams when a seed is
        set).  ``on_text(i, piece)`` (optional) receives each sample's text as
        it is produced (pieces concatenate to the final text).  ``progress(n)``
        (optional) is called after every decoding step with the tokens drawn.
        """
        rows = min(batch_size or num, num)
        self._check(num, options, rows)
        jobs = self._jobs(context_index, context, num, options.seed, first, on_text)
        texts = [""] * num
        for job, text in self._decode(iter([jobs]), options, batch_size or num, read_ahead=True,
                                      progress=progress, rows=rows):
            texts[job.index - first] = text
        return texts

    def generate_many(self, contexts: Iterable[str], num: int = 1, options: GenerateOptions = GenerateOptions(),
                      batch_size: int = 16, read_ahead: bool = True,
                      progress: Optional[Callable[[int], None]] = None) -> Iterator[Sample]:
        """``num`` samples for each context, yielded in order (context by
        context, sample by sample) as soon as they and those before them are done.

        Up to ``batch_size`` samples are decoded together, from as many
        contexts as needed to fill the batch; with the numpy engine a
        finished sample's place goes to the next one at once, the
        TensorFlow engine starts the next batch when all are done.  Contexts are read lazily; with
        ``read_ahead`` False the next context is read only when nothing is
        left to decode (for contexts typed by a person).  Sample i of context
        j draws from the same random stream as ``generate(context, ...,
        context_index=j)`` would give it, so the texts do not depend on the
        batching.

        An error while reading the contexts (a bad input line) or encoding one
        ends the run only after every sample of the contexts before it was
        finished and yielded: nothing read before the bad line is lost.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        rows = self.planned_rows(num, batch_size, len(contexts) if hasattr(contexts, "__len__") else None)
        self._check(num, options, rows)
        numbers = itertools.count()

        def sources():
            for context_index, context in enumerate(contexts):
                jobs = self._jobs(context_index, context, num, options.seed)
                for job in jobs:
                    job.order = next(numbers)
                yield jobs

        done = {}
        following = 0
        for job, text in self._decode(sources(), options, batch_size, read_ahead, progress, rows=rows):
            done[job.order] = Sample(job.context_index, job.context, job.index, text)
            while following in done:
                yield done.pop(following)
                following += 1

    # -- decoding --------------------------------------------------------------------------

    def _emit(self, row: _SampleInProgress, piece: str, max_length: int, stop: Sequence[str] = (),
              final: bool = False):
        if row.job.on_text is None:
            return
        if stop:  # what is sent never holds a stop string nor the start of one
            text = row.assembler.text[:max_length]
            text = cut_at_stop(text, stop)[0] if final else text[:len(text) - held_back(text, stop)]
            if len(text) > row.emitted:
                piece, row.emitted = text[row.emitted:], len(text)
                row.job.on_text(piece)
            return
        if not piece:
            return
        room = max_length - row.emitted
        if room > 0:
            piece = piece[:room]
            row.emitted += len(piece)
            row.job.on_text(piece)

    def _draw(self, active: List[_SampleInProgress], logits: np.ndarray, params: SamplingParams,
              max_length: int, max_tokens: Optional[int] = None, stop: Sequence[str] = ()):
        """One token for every row: (tokens, indices of the rows that finished)."""
        eos = self.enc.eos_id
        tokens = np.zeros(len(active), dtype=np.int64)
        finished = []
        for b, row in enumerate(active):
            in_min = row.steps < params.min_length
            token = choose(logits[b], params, row.job.rng, forbid=eos if in_min else None)
            row.steps += 1
            if token == eos and not in_min:
                self._emit(row, row.assembler.finish(), max_length, stop, final=True)
                finished.append(b)
                continue
            piece = row.assembler.push(token)
            tokens[b] = token
            text = row.assembler.text
            if (stop and cut_at_stop(text[max(0, row.emitted - max(map(len, stop))):], stop)[1]) \
                    or (max_tokens is not None and row.steps >= max_tokens):
                self._emit(row, piece + row.assembler.finish(), max_length, stop, final=True)
                finished.append(b)
                continue
            self._emit(row, piece, max_length, stop, final=len(text) >= max_length)
            if len(text) >= max_length:
                finished.append(b)
        return tokens, finished

    def _feed(self, engine, active: List[_SampleInProgress], tokens: np.ndarray,
              params: SamplingParams) -> np.ndarray:
        """Feed every row its token; the logits that follow [rows, n_vocab]."""
        hp = self.model.hparams
        lengths = engine.lengths()
        rewinds = {}
        stepping, restarting = [], []
        for b, row in enumerate(active):
            token = int(tokens[b])
            if params.min_length and row.steps == params.min_length:
                # The original's second sampling loop starts from the cache
                # of the context without its last token, then feeds the last
                # token drawn.
                base = len(row.job.ids) - 1
                rewinds.setdefault(base, []).append(b)
                lengths[b] = base
                row.window = row.window[:base] + [token]
            else:
                row.window.append(token)
            if lengths[b] >= hp.n_ctx:
                # Sliding window: continue from the most recent n_ctx/2 tokens.
                row.window = row.window[-(hp.n_ctx // 2):]
                restarting.append(b)
            else:
                stepping.append(b)
        for base, rows in rewinds.items():
            engine.truncate(rows, base)
        return engine.feed(tokens[stepping], stepping, restarting, [active[b].window for b in restarting])

    @staticmethod
    def planned_rows(num: int, batch_size: int, contexts: Optional[int] = None) -> int:
        """Samples ``generate_many`` decodes at once at most: ``batch_size``, or fewer when the number of
        ``contexts`` is known and they have fewer samples."""
        return batch_size if contexts is None else max(1, min(batch_size, num * contexts))

    def _decode(self, sources: Iterator[List[_Job]], options: GenerateOptions, batch_size: int,
                read_ahead: bool, progress: Optional[Callable[[int], None]] = None,
                rows: Optional[int] = None) -> Iterator[tuple]:
        """Decode the jobs that ``sources`` gives (a list of jobs per context);
        yields (job, text) as samples finish.  An exception from ``sources`` is
        raised once every job it gave before has been finished."""
        max_length = options.max_length
        if max_length == 0 or options.max_tokens == 0:
            for jobs in sources:
                for job in jobs:
                    yield job, ""
            return
        stats = self.stats
        failure: Optional[Exception] = None
        params = options.sampling()
        hp = self.model.hparams
        engine = self.engine(rows)
        engine.clear()
        pending: Deque[_Job] = deque()
        exhausted = False
        active: List[_SampleInProgress] = []
        logits = np.empty((0, hp.n_vocab), np.float32)

        def take() -> List[_Job]:
            """The jobs that join the batch now."""
            nonlocal exhausted, failure
            if active and not engine.joins_running:
                return []
            joining = []
            while len(active) + len(joining) < batch_size:
                if not pending:
                    if exhausted or (not read_ahead and (active or joining)):
                        break
                    try:
                        more = next(sources, None)
                    except Exception as e:  # a bad input line: finish what came before it first
                        failure, more = e, None
                    if more is None:
                        exhausted = True
                        break
                    pending.extend(more)
                    continue
                joining.append(pending.popleft())
            return joining

        while True:
            joining = take()
            if joining:
                t0 = time.perf_counter()
                fresh = engine.add([job.ids for job in joining])
                stats.prefill_seconds += time.perf_counter() - t0
                stats.prefill_tokens += sum(len(job.ids) for job in joining)
                logits = np.concatenate([logits, fresh]) if active else fresh
                active += [_SampleInProgress(job, TextAssembler(self.enc), list(job.ids)) for job in joining]
            if not active:
                if failure is not None:
                    raise failure
                return
            t_step = time.perf_counter()  # sampling, text and the decoding step count as decoding
            tokens, finished = self._draw(active, logits, params, max_length, options.max_tokens, options.stop)
            stats.tokens += len(active)
            if progress is not None:
                progress(len(active))
            if finished:
                retry = []
                for b in finished:
                    row = active[b]
                    text = cut_at_stop(row.assembler.text[:max_length], options.stop)[0]
                    if text == "" and row.job.attempt < RETRIES_FOR_EMPTY:
                        row.job.attempt += 1  # the original draws an empty sample again
                        retry.append(row.job)
                    else:
                        yield row.job, text
                pending.extendleft(reversed(retry))
                gone = set(finished)
                keep = [b for b in range(len(active)) if b not in gone]
                engine.keep(keep)
                active = [active[b] for b in keep]
                tokens = tokens[keep]
                if not active:
                    logits = np.empty((0, hp.n_vocab), np.float32)
                    stats.decode_seconds += time.perf_counter() - t_step
                    continue
            logits = self._feed(engine, active, tokens, params)
            stats.decode_seconds += time.perf_counter() - t_step
