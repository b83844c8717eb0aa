"""Text generation: the original gpt2-generate.py's semantics, decoded incrementally.

    from tasks.generate import Generator, GenerateOptions
    gen = Generator(m, enc)
    texts = gen.generate("江戸時代の", num=3, options=GenerateOptions(top_k=20, seed=1))
    for s in gen.generate_many(["今日は", "明日は"], num=2, options=GenerateOptions(seed=1)):
        print(s.context_index, s.index, s.text)

What the original does, and this module with it:
- the context is encoded and only its last n_ctx/2 tokens are kept; an empty
  context means <|endoftext|>;
- tokens are drawn through the sampler chain of ``tasks.sampling``;
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
from as many contexts as it takes, on the one decoding loop of
``tasks.scheduler`` (which the server and bulk jobs use too): every sample is a
sequence of the decoder's row table with its own length, so samples of
different contexts share a batch, a finished sample's place goes to the next
one at once, and each rewinds and slides its window on its own, exactly as it
would alone.  Every sample has its own random stream: sample i of context j
with seed s draws from ``SeedSequence([s, j, i])``, so a sample does not
depend on how samples are batched.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, fields
from typing import Callable, Deque, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from model import choose_engine, decoder as new_decoder

from . import memory
from .errors import OptionError
from .sampling import SamplingParams
from .scheduler import RETRIES_FOR_EMPTY, GenerationStats, Job, SampleRequest, Scheduler
from .text import TextAssembler, context_ids, cut_at_stop, held_back

__all__ = ["Generator", "GenerateOptions", "GenerationStats", "Sample", "TextAssembler", "RETRIES_FOR_EMPTY",
           "cut_at_stop", "held_back"]


@dataclass(frozen=True)
class GenerateOptions(SamplingParams):
    """What to generate and how: every sampling control of ``SamplingParams`` (see
    ``tasks.sampling`` and docs/sampling.md for each control's meaning and neutral value; ``top_k``
    None is the original's default: 40, or no limit when top_p > 0), and when a sample ends.
    ``sampling()`` gives the sampling part alone (what the scheduler groups rows by)."""

    max_length: int = 500  # characters
    seed: Optional[int] = None
    max_tokens: Optional[int] = None  # tokens per sample at most (None: no limit)
    stop: Tuple[str, ...] = ()  # a sample ends before the first occurrence of any of these

    def __post_init__(self):
        super().__post_init__()  # validates (and normalises) every sampling field
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
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)})


@dataclass(frozen=True)
class Sample:
    """One generated sample: sample ``index`` of context number ``context_index``.

    With ``generate_many(..., details=True)`` also ``tokens``, the token ids drawn (the final attempt's,
    without the ending <|endoftext|>; they decode to ``text`` unless max_length or a stop string cut it),
    and ``logprob``, the sum of their natural-log probabilities under the model's raw logits (before any
    sampling control), each given the tokens the model saw: the context and the tokens drawn before it,
    unless ``min_length`` (the original's rewind) or the sliding window past n_ctx changed that view.
    Without details they are ``()`` and None."""

    context_index: int
    context: str
    index: int
    text: str
    tokens: Tuple[int, ...] = ()
    logprob: Optional[float] = None


@dataclass
class _Tag:
    """What the CLI's driver knows of a job: which sample of which context it is."""

    context_index: int
    context: str
    index: int
    order: int = 0


class Generator:
    """Generates samples with a loaded Model and Encoder.

    ``engine``: 'auto' (``model.choose_engine``: float32 ONNX Runtime on a CPU, the TensorFlow
    cache on a GPU), 'onnx', 'numpy' (the reference engine) or 'tf'.  ``decoder``: a decoder
    (``model.rows.RowDecoder``) to use instead of a new one; ``engine`` is then its ``engine``.
    ``quantize``: 'q8' or 'q4' decodes with 8-/4-bit weights (engine 'onnx', ``model.ortdecode``;
    the weights are made on first use and cached, see ``model.quantize``); None (the default)
    keeps float32 weights.  The decoder is made when first needed (``engine()``) and kept.
    """

    def __init__(self, model, enc, engine: str = "auto", decoder=None, quantize: Optional[str] = None):
        self.model = model
        self.enc = enc
        self.quantize = decoder.quantize if decoder is not None else quantize
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
        return context_ids(self.enc, context, self.model.hparams.n_ctx)

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
        options.sampling().check_model(hp)  # min_length, token ids of logit_bias and ban
        # Each sample decoded at once holds keys and values of up to n_ctx tokens.
        per_row = 2 * 4 * hp.n_layer * hp.n_ctx * hp.n_embd
        memory.check("batch_size", rows, rows * per_row, f"the key/value caches of {rows} samples decoded together")

    def _jobs(self, context_index: int, context: str, num: int, options: "GenerateOptions", first: int = 0,
              on_text: Optional[Callable[[int, str], None]] = None, details: bool = False) -> List[Job]:
        ids = self.context_ids(context)
        params = options.sampling()
        jobs = []
        for i, rng in enumerate(self.rngs(options.seed, context_index, num, first)):
            request = SampleRequest(ids, params, rng=rng, max_tokens=options.max_tokens,
                                    max_length=options.max_length, stop=options.stop,
                                    logprobs=0 if details else None)
            on_event = None
            if on_text is not None:
                on_event = (lambda job, kind, piece, i=first + i: on_text(i, piece))
            jobs.append(Job(request, on_event, tag=_Tag(context_index, context, first + i)))
        return jobs

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
        jobs = self._jobs(context_index, context, num, options, first, on_text)
        texts = [""] * num
        for job in self._decode(iter([jobs]), options, batch_size or num, read_ahead=True,
                                progress=progress, rows=rows):
            texts[job.tag.index - first] = job.text
        return texts

    def generate_many(self, contexts: Iterable[str], num: int = 1, options: GenerateOptions = GenerateOptions(),
                      batch_size: int = 16, read_ahead: bool = True,
                      progress: Optional[Callable[[int], None]] = None, details: bool = False) -> Iterator[Sample]:
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

        ``details``: the Samples also carry ``tokens`` and ``logprob`` (see ``Sample``); the texts are
        the same either way (each drawn token's log-probability is read off the logits the decoder
        computed anyway).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        known = len(contexts) if hasattr(contexts, "__len__") else None
        rows = self.planned_rows(num, batch_size, known)
        # With contexts read lazily (--contexts FILE) the batch fills only as far as there are
        # samples: memory is checked up front for the first context's samples, then as the batch
        # grows (see _decode), so a large --batch_size is never refused for rows never used.
        self._check(num, options, rows if known is not None else min(rows, num))
        numbers = itertools.count()

        def sources():
            for context_index, context in enumerate(contexts):
                jobs = self._jobs(context_index, context, num, options, details=details)
                for job in jobs:
                    job.tag.order = next(numbers)
                yield jobs

        done = {}
        following = 0
        for job in self._decode(sources(), options, batch_size, read_ahead, progress, rows=rows,
                                checked=None if known is not None else min(rows, num)):
            tag = job.tag
            if details:
                done[tag.order] = Sample(tag.context_index, tag.context, tag.index, job.text, tuple(job.tokens),
                                         float(sum(lp for _, lp, _ in job.logprobs)))
            else:
                done[tag.order] = Sample(tag.context_index, tag.context, tag.index, job.text)
            while following in done:
                yield done.pop(following)
                following += 1

    @staticmethod
    def planned_rows(num: int, batch_size: int, contexts: Optional[int] = None) -> int:
        """Samples ``generate_many`` decodes at once at most: ``batch_size``, or fewer when the number of
        ``contexts`` is known and they have fewer samples."""
        return batch_size if contexts is None else max(1, min(batch_size, num * contexts))

    def _decode(self, sources: Iterator[List[Job]], options: GenerateOptions, batch_size: int,
                read_ahead: bool, progress: Optional[Callable[[int], None]] = None,
                rows: Optional[int] = None, checked: Optional[int] = None) -> Iterator[Job]:
        """Decode the jobs that ``sources`` gives (a list of jobs per context) on the one
        scheduler; yields each job as it finishes (its ``tag``, ``text``, ``tokens``, ``logprobs``).
        An exception from ``sources`` is raised once every job it gave before has been finished.
        ``checked``: how many rows the memory was checked for (None: all of ``batch_size``); the
        batch grows past it only while the memory holds the key/value caches of the larger batch
        (doubling), else it stays there."""
        if options.max_length == 0 or options.max_tokens == 0:
            for jobs in sources:
                for job in jobs:
                    yield job
            return
        sch = Scheduler(self.engine(rows), self.enc, batch_size, self.stats)
        hp = self.model.hparams
        per_row = 2 * 4 * hp.n_layer * hp.n_ctx * hp.n_embd
        limit = batch_size if checked is None else checked  # rows the memory is known to hold
        failure: Optional[Exception] = None
        pending: Deque[Job] = deque()
        exhausted = False
        while True:
            joining: List[Job] = []
            while len(joining) < sch.free - max(0, batch_size - limit):
                if not pending:
                    if exhausted or (not read_ahead and (sch.busy or joining)):
                        break
                    try:
                        more = next(sources, None)
                    except Exception as e:  # a bad input line: finish what came before it first
                        failure, more = e, None
                    if more is None:
                        exhausted = True
                        break
                    pending.extend(more)
                    if limit < batch_size and len(pending) + sch.occupied + len(sch.retrying) > limit:
                        grown = min(batch_size, max(2 * limit, len(pending) + sch.occupied))
                        try:
                            memory.check("batch_size", grown, grown * per_row, "")
                            limit = grown
                        except OptionError:
                            pass  # the batch stays at the rows the memory holds
                    continue
                joining.append(pending.popleft())
            sch.admit(joining)
            if not sch.busy:
                if failure is not None:
                    raise failure
                return
            drawn = len(sch.active)
            events = sch.step()
            if progress is not None:
                progress(drawn)
            for job, kind, data in events:
                if kind == "text":
                    job.on_event(job, kind, data)
                elif kind == "done":
                    yield job
