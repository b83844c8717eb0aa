"""The sweep as a library call: every setting decodes the same contexts with the same seeds, then its text
is measured; results per setting x context-length bucket, resumable, written atomically.

    from tasks.sweep import Sweep, SweepConfig, parse_axis, settings
    sweep = Sweep(m, enc, contexts, SweepConfig(num=8, seed=1, max_tokens=128), judge=None, reference=texts)
    rows = sweep.run(settings([parse_axis("top_k=1,20,40")], False, sweep.base), "out/")

Per setting, for each context (its ``num`` samples; ``metrics`` has the definitions).  A sample's tokens
are the ones drawn (``Generator.generate_many(..., details=True)``); only a text that ``max_length`` or a
stop string cut is re-encoded from the text.

- ``rep2``/``rep3``/``rep4`` (pooled over the context's samples) and ``diversity``;
- ``distinct2``/``distinct3`` and ``self_bleu`` across the context's samples; ``loop`` (share of samples
  that end in a loop);
- ``length`` (tokens of a sample) and ``early_end`` (share of samples that ended
  before ``max_tokens`` tokens and ``max_length`` characters: at <|endoftext|>, or a stop string);
- ``perplexity``: exp of the mean negative log-probability of the continuation's tokens given the context,
  under the judge (the generating model unless another is given; for the generating model these are
  the log-probabilities generation computed as it drew the tokens, where they are exactly that: see
  ``Sweep.drawn``);
- ``pmi``: per token, log p(continuation | context) - log p(continuation | <|endoftext|>), under the judge;
- ``cosine``: of the context's and the continuation's sentence vectors: the generating model's final
  hidden states averaged over the text's tokens, each text read after <|endoftext|> (as the model read
  every document it learnt from: the position after <|endoftext|> is not the first one, whose hidden state
  GPT-2 makes an outlier, and the same forward pass gives log p(continuation | <|endoftext|>));

``pmi``, ``cosine`` and ``mauve`` need that second forward pass over a continuation, which costs about a
quarter of what drawing its tokens costs; they are read from the first ``relation_samples`` samples of
each context that hold a token (default 1; ``None``: all) -- a context's samples are drawn independently,
so its first ones are a random subset and the mean over contexts is still an unbiased estimate; the
bootstrap interval over contexts carries the extra spread.  Every other metric reads every sample.

and over the setting's samples together: ``zipf`` (its interval from resampled contexts) and, with a
reference, ``mauve`` (generated vs reference sentence vectors, read as for ``cosine``; no interval: one MAUVE
costs a k-means).
Each per-context metric is reported as its mean over contexts with a percentile bootstrap interval over
contexts, for all contexts and for each context-length bucket.  The reference's own statistics (those
that need no context: rep-n, diversity, loop, length, zipf, perplexity given <|endoftext|>) are a row
with setting ``reference``, computed from the reference text alone.

Files in the output directory: ``run.json`` (what the sweep is: resuming checks it is the same),
``settings/<id>.json`` (one per finished setting: its samples and per-context values; what ``--resume``
skips), ``results.jsonl`` and ``results.csv`` (rewritten after every setting), and -- from
``tasks.sweep.report`` -- plots and ``report.html``.  Every file is written atomically
(``util.files``): an interruption leaves the files of the settings finished before it, never a part of one.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from util.files import atomic_file

from ..errors import OptionError
from ..generate import GenerateOptions, Generator, Sample
from . import metrics as M
from .grid import Setting
from .passes import forward_rows

#: Metrics with one value per context (mean over contexts, bootstrap interval over contexts).
CONTEXT_METRICS = ("rep2", "rep3", "rep4", "diversity", "distinct2", "distinct3", "self_bleu", "loop",
                   "length", "early_end", "perplexity", "pmi", "cosine")
#: Metrics of a setting's samples together.
SET_METRICS = ("zipf", "mauve")
METRICS = CONTEXT_METRICS + SET_METRICS
#: Metrics that the reference text has by itself.
REFERENCE_METRICS = ("rep2", "rep3", "rep4", "diversity", "loop", "length", "perplexity", "zipf")

STATE_VERSION = 3  # 3: vectors read after <|endoftext|>, relation_samples; 2: a sample's tokens are the
                   # ones drawn (1: its text re-encoded)


class SweepError(OptionError):
    """What the output directory or the inputs do not allow (reported as ``--output ...`` etc.)."""


@dataclass(frozen=True)
class SweepConfig:
    num: int = 4                      # samples per context and setting
    seed: int = 1
    max_tokens: int = 64
    max_length: int = 500             # characters
    batch_size: int = 16
    buckets: Tuple[int, ...] = (16, 64, 256)  # context-length bucket edges, in tokens
    resamples: int = 1000             # bootstrap resamples
    pooling: str = "mean"             # sentence vectors for cosine and MAUVE
    relation_samples: Optional[int] = 1  # samples per context that pmi, cosine and MAUVE read (None: all)

    def __post_init__(self):
        if self.relation_samples is not None and self.relation_samples < 1:
            raise OptionError("relation_samples", f"must be at least 1 (or all), got {self.relation_samples}")
        if self.num < 1:
            raise OptionError("num_generate", f"must be at least 1, got {self.num}")
        if self.max_tokens is None or self.max_tokens < 1:
            raise OptionError("max_tokens", f"must be at least 1 for a sweep, got {self.max_tokens}")
        if list(self.buckets) != sorted(set(self.buckets)) or any(b < 1 for b in self.buckets):
            raise OptionError("buckets", f"must be increasing positive token counts, got {list(self.buckets)}")


def bucket_names(edges: Sequence[int]) -> List[str]:
    """Labels of the buckets that ``edges`` cut: 1-15, 16-63, ..., 256+."""
    bounds = [1, *edges]
    names = [f"{lo}-{hi - 1}" for lo, hi in zip(bounds, bounds[1:]) if hi - 1 >= lo]
    return names + [f"{bounds[-1]}+"]


def bucket_of(length: int, edges: Sequence[int]) -> str:
    names = bucket_names(edges)
    for i, edge in enumerate(edges):
        if length < edge:
            return names[i]
    return names[-1]


def _finite(x) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


class Sweep:
    """A sweep over one model (``m``, ``enc``) and a list of contexts.

    ``judge``: the model whose log-probabilities give perplexity and PMI (default ``m``; it must share
    the vocabulary).  ``reference``: human texts (one per item) for the reference row and MAUVE.
    ``engine``/``quantize``: as ``Generator``.  ``base``: the options every setting changes (default
    gpt2-generate.py's, top_k 40); its seed, max_tokens and max_length are replaced by the config's.
    """

    def __init__(self, m, enc, contexts: Sequence[str], config: SweepConfig = SweepConfig(), judge=None,
                 reference: Optional[Sequence[str]] = None, engine: str = "auto", quantize: Optional[str] = None,
                 model_name: str = "", judge_name: str = "", base: Optional[GenerateOptions] = None):
        if not contexts:
            raise OptionError("contexts", "holds no context")
        self.model = m
        self.enc = enc
        self.contexts = list(contexts)
        self.config = config
        self.judge = judge if judge is not None else m
        self.reference = [t for t in reference if t.strip()] if reference is not None else None
        if self.reference is not None and not self.reference:
            raise OptionError("reference", "holds no text")
        self.generator = Generator(m, enc, engine=engine, quantize=quantize)
        self.model_name = model_name or str(getattr(m, "path", ""))
        self.judge_name = judge_name or (self.model_name if judge is None else str(getattr(judge, "path", "")))
        self.context_ids = [self.generator.context_ids(c) for c in self.contexts]
        # the options every setting starts from (its seed, max_tokens and max_length are the config's)
        self.base = dataclasses.replace(base or GenerateOptions(top_k=40), seed=config.seed,
                                        max_tokens=config.max_tokens, max_length=config.max_length)
        self._context_vectors = None
        self._reference_pass = None
        self.timings = {"generate": 0.0, "metrics": 0.0}
        self._rows: Dict[tuple, List[dict]] = {}

    # -- the run ---------------------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        """What must be the same for --resume to reuse a finished setting."""
        digest = hashlib.sha256("\n".join(self.contexts).encode("utf-8")).hexdigest()
        ref = None if self.reference is None else hashlib.sha256("\n".join(self.reference).encode()).hexdigest()
        return {"version": STATE_VERSION, "model": self.model_name, "judge": self.judge_name, "contexts": digest,
                "reference": ref,
                # (the bootstrap and the buckets are recomputed from the finished settings; batching changes no sample)
                "config": {k: v for k, v in asdict(self.config).items()
                           if k not in ("resamples", "batch_size", "buckets")},
                "base": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.base).items()}}

    def run(self, settings: Sequence[Setting], output: str, resume: bool = False,
            progress: Optional[Callable[[int], None]] = None,
            log: Optional[Callable[[str], None]] = None) -> List[dict]:
        """Run every setting not finished yet in ``output``; returns the result rows (also written there).

        ``progress(n)``: n more samples generated.  ``log(line)``: one line per setting started/finished.
        Without ``resume`` the output directory must not hold a sweep already."""
        out = Path(output)
        log = log or (lambda line: None)
        state_dir = out / "settings"
        run_file = out / "run.json"
        fingerprint = self.fingerprint()
        if run_file.exists():
            if not resume:
                raise SweepError("output", f"{output} already holds a sweep: add --resume to continue it, "
                                           "or choose another directory")
            try:
                old = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise SweepError("output", f"cannot read {run_file}: {e}") from None
            if old.get("fingerprint") != fingerprint:
                changed = sorted(k for k in fingerprint if old.get("fingerprint", {}).get(k) != fingerprint[k])
                raise SweepError("resume", f"{output} holds a sweep with other {', '.join(changed)}: resume it "
                                           "with the same model, contexts, reference and flags, or choose "
                                           "another directory")
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SweepError("output", f"cannot create {state_dir}: {e.strerror or e}") from None
        _write_json(run_file, {"fingerprint": fingerprint,
                               "settings": [{"key": s.key, "label": s.label, "family": s.family} for s in settings]})
        done: Dict[str, dict] = {}
        for s in settings:
            path = state_dir / _state_name(s)
            if resume and path.exists():
                try:
                    state = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    state = None
                if state is not None and state.get("key") == s.key:
                    done[s.key] = state
        if done:
            log(f"resuming: {len(done)} of {len(settings)} settings already finished, skipped")
        reference = self.reference_state(state_dir) if self.reference is not None else None
        todo = [s for s in settings if s.key not in done]
        started = time.perf_counter()
        for count, s in enumerate(todo, 1):
            number = settings.index(s) + 1
            t0 = time.perf_counter()
            log(f"[{number}/{len(settings)}] {s.label}")
            state = self.measure_setting(s, progress)
            _write_json(state_dir / _state_name(s), state)
            done[s.key] = state
            self.write_results(out, settings, done, reference)
            now = time.perf_counter()
            left = (now - started) / count * (len(todo) - count)
            log(f"[{number}/{len(settings)}] {s.label}: done in {now - t0:.1f} s "
                f"(generation {state['seconds']['generate']:.1f} s, metrics {state['seconds']['metrics']:.1f} s)"
                + (f"; about {_duration(left)} left" if count < len(todo) else ""))
        return self.write_results(out, settings, done, reference)

    def write_results(self, out: Path, settings: Sequence[Setting], done: Dict[str, dict],
                      reference: Optional[dict]) -> List[dict]:
        rows = []
        for s in settings:
            if s.key in done:
                rows.extend(self._rows_of(done[s.key], s.family))
        if reference is not None:
            rows.extend(self._rows_of(reference, "reference"))
        _write_text(out / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        _write_text(out / "results.csv", to_csv(rows))
        return rows

    # -- one setting ------------------------------------------------------------------------------------

    def generate(self, options: GenerateOptions, progress=None) -> List[List[str]]:
        """The samples' texts of every context, [context][sample]."""
        return [[s.text for s in group] for group in self.generate_samples(options, progress, details=False)]

    def generate_samples(self, options: GenerateOptions, progress=None, details: bool = True) -> List[List[Sample]]:
        """The samples of every context, [context][sample]: with ``details`` their drawn tokens and
        log-probability too (``Generator.generate_many(..., details=True)``; the texts are the same)."""
        samples: List[List[Sample]] = [[] for _ in self.contexts]
        for sample in self.generator.generate_many(self.contexts, self.config.num, options,
                                                   batch_size=self.config.batch_size, details=details):
            samples[sample.context_index].append(sample)
            if progress is not None:
                progress(1)
        return samples

    def drawn(self, samples: List[List[Sample]],
              options: GenerateOptions) -> List[List[Optional[Tuple[List[int], float]]]]:
        """For each sample, (its drawn tokens, log p(them | context)) where generation computed exactly what
        perplexity and PMI need -- else None (its text is then re-encoded and scored under the judge).
        Exact when: the judge is the generating model and it decodes with its own float32 weights (not
        ``quantize``d), there is no ``min_length`` (whose rewind hides tokens from the model), the tokens
        decode to the text (max_length or a stop string did not cut it) and the context and the tokens fit
        in n_ctx (no sliding window)."""
        usable = (self.judge is self.model and self.generator.quantize is None and not options.min_length)
        n_ctx = self.model.hparams.n_ctx
        out: List[List[Optional[Tuple[List[int], float]]]] = []
        for c, group in enumerate(samples):
            row = []
            for s in group:
                ok = (usable and s.logprob is not None and len(self.context_ids[c]) + len(s.tokens) <= n_ctx
                      and self.enc.decode(s.tokens) == s.text)
                row.append((list(s.tokens), s.logprob) if ok else None)
            out.append(row)
        return out

    def measure_setting(self, setting: Setting, progress=None) -> dict:
        t0 = time.perf_counter()
        samples = self.generate_samples(setting.options, progress)
        t1 = time.perf_counter()
        state = self.measure([[s.text for s in group] for group in samples], self.drawn(samples, setting.options))
        t2 = time.perf_counter()
        self.timings["generate"] += t1 - t0
        self.timings["metrics"] += t2 - t1
        state.update(key=setting.key, label=setting.label, family=setting.family,
                     values={k: (list(v) if isinstance(v, tuple) else v) for k, v in setting.values},
                     seconds={"generate": t1 - t0, "metrics": t2 - t1})
        return state

    def measure(self, texts: List[List[str]],
                drawn: Optional[List[List[Optional[Tuple[List[int], float]]]]] = None) -> dict:
        """Per-context values and set values of the samples ``texts`` [context][sample].

        ``drawn`` (optional, as ``drawn`` gives it): a sample's tokens and log p(tokens | context) from
        generation; a sample without them is re-encoded from its text and scored given its context.
        Then one plan of forward passes (``passes.forward_rows``) reads the relation samples (the first
        ``relation_samples`` of each context that hold a token) after <|endoftext|> -- their log-probability
        given it and their sentence vector -- and scores given its context any sample that needs it."""
        enc, cfg = self.enc, self.config
        clock = _Clock()
        drawn = drawn or [[None] * len(group) for group in texts]
        ids = [[list(d[0]) if d is not None else (list(enc.encode(t)) if t else []) for t, d in zip(group, ds)]
               for group, ds in zip(texts, drawn)]
        flat = [(c, j) for c, group in enumerate(ids) for j in range(len(group))]
        clock.lap("encode")
        related = self.relation_subset(ids)
        lp, lp0, vectors = self._forward(flat, ids, drawn, related)
        where = {cj: k for k, cj in enumerate(related)}
        cos = (M.cosine(vectors, self.context_vectors()[[c for c, _ in related]]) if related
               else np.zeros(0, np.float32))
        clock.lap("forward")
        per_sample: Dict[Tuple[int, int], dict] = {}
        for k, (c, j) in enumerate(flat):
            n = len(ids[c][j])
            r = where.get((c, j))
            per_sample[c, j] = {"n": n, "lp": lp[k] if n else 0.0, "lp0": lp0[r] if r is not None else None,
                                "cos": float(cos[r]) if r is not None else None}
        contexts = []
        for c, group in enumerate(ids):
            samples = [per_sample[c, j] for j in range(len(group))]
            tokens = sum(s["n"] for s in samples)
            lp = sum(s["lp"] for s in samples)
            scored = [s for s in samples if s["lp0"] is not None]
            values = {
                "rep2": M.rep_n_pooled(group, 2), "rep3": M.rep_n_pooled(group, 3), "rep4": M.rep_n_pooled(group, 4),
                "diversity": M.diversity(group),
                "distinct2": M.distinct_n(group, 2), "distinct3": M.distinct_n(group, 3),
                "self_bleu": M.self_bleu(texts[c]) if len(texts[c]) > 1 else float("nan"),
                "loop": float(np.mean([M.ends_in_loop(x) for x in group])),
                "length": float(np.mean([len(x) for x in group])),
                "early_end": float(np.mean([len(x) < cfg.max_tokens and len(t) < cfg.max_length
                                            for x, t in zip(group, texts[c])])),
                "perplexity": math.exp(-lp / tokens) if tokens else float("nan"),
                "pmi": float(np.mean([(s["lp"] - s["lp0"]) / s["n"] for s in scored])) if scored else float("nan"),
                "cosine": float(np.mean([s["cos"] for s in scored])) if scored else float("nan"),
            }
            contexts.append({"index": c, "context_tokens": len(self.context_ids[c]),
                             "samples": [{"text": t, "ids": x} for t, x in zip(texts[c], group)],
                             "values": {k: _finite(v) for k, v in values.items()}})
        clock.lap("text")
        state = {"contexts": contexts, "mauve": None}
        if self.reference is not None:
            state["mauve"] = self._mauve(vectors)
            clock.lap("mauve")
        state["metric_seconds"] = clock.laps
        return state

    def reference_state(self, state_dir: Path) -> dict:
        """The reference text's own statistics (cached in ``settings/reference.json``)."""
        path = state_dir / "reference.json"
        if path.exists():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
                if state.get("fingerprint") == self.fingerprint()["reference"]:
                    return state
            except (OSError, ValueError):
                pass
        ids, plain, _ = self.reference_pass()
        items = []
        for k, x in enumerate(ids):
            n = len(x)
            values = {"rep2": M.rep_n_pooled([x], 2), "rep3": M.rep_n_pooled([x], 3), "rep4": M.rep_n_pooled([x], 4),
                      "diversity": M.diversity([x]), "loop": float(M.ends_in_loop(x)), "length": float(n),
                      "perplexity": math.exp(-float(plain[k].sum()) / n) if n else float("nan")}
            items.append({"index": k, "context_tokens": None, "samples": [{"text": self.reference[k], "ids": x}],
                          "values": {m: _finite(values.get(m)) for m in CONTEXT_METRICS}})
        state = {"key": "reference", "label": "reference", "family": "reference", "values": {},
                 "contexts": items, "mauve": None, "fingerprint": self.fingerprint()["reference"]}
        _write_json(path, state)
        return state

    # -- aggregation ----------------------------------------------------------------------------------

    def _rows_of(self, state: dict, family: str) -> List[dict]:
        """``rows``, computed once per setting (the results are rewritten after every setting)."""
        key = (state["key"], family)
        if key not in self._rows:
            self._rows[key] = self.rows(state, family)
        return self._rows[key]

    def rows(self, state: dict, family: str) -> List[dict]:
        """One row per bucket (``all`` first) of a setting's state: each metric's estimate and interval."""
        cfg = self.config
        is_reference = state["key"] == "reference"
        groups: Dict[str, List[dict]] = {"all": state["contexts"]}
        if not is_reference:
            for name in bucket_names(cfg.buckets):
                groups[name] = [c for c in state["contexts"] if bucket_of(c["context_tokens"], cfg.buckets) == name]
        rows = []
        for bucket, items in groups.items():
            if not items:
                continue
            row = {"setting": state["label"], "family": family, "values": state["values"], "bucket": bucket,
                   "contexts": len(items), "samples": sum(len(c["samples"]) for c in items)}
            for m in CONTEXT_METRICS:
                if is_reference and m not in REFERENCE_METRICS:
                    est = low = high = None
                else:
                    vals = [c["values"][m] for c in items if c["values"].get(m) is not None]
                    est, low, high = M.bootstrap_ci(vals, resamples=cfg.resamples, seed=cfg.seed)
                row[m], row[m + "_low"], row[m + "_high"] = _finite(est), _finite(low), _finite(high)
            token_lists = [[s["ids"] for s in c["samples"]] for c in items]
            est, low, high = M.zipf_bootstrap(token_lists, resamples=min(cfg.resamples, 200), seed=cfg.seed)
            row["zipf"], row["zipf_low"], row["zipf_high"] = _finite(est), _finite(low), _finite(high)
            row["mauve"] = _finite(state.get("mauve")) if bucket == "all" else None
            row["mauve_low"] = row["mauve_high"] = None
            rows.append(row)
        return rows

    # -- models ------------------------------------------------------------------------------------

    def relation_subset(self, ids: List[List[List[int]]]) -> List[Tuple[int, int]]:
        """The samples (context, index) that pmi, cosine and MAUVE read: the first ``relation_samples`` of
        each context that hold a token (all of them where it is None)."""
        k = self.config.relation_samples
        out = []
        for c, group in enumerate(ids):
            chosen = [(c, j) for j, x in enumerate(group) if x]
            out += chosen if k is None else chosen[:k]
        return out

    def _forward(self, flat: List[Tuple[int, int]], ids: List[List[List[int]]],
                 drawn: List[List[Optional[Tuple[List[int], float]]]],
                 related: List[Tuple[int, int]]) -> Tuple[List[float], List[float], np.ndarray]:
        """(per sample of ``flat``: log p(tokens | context), drawn or scored under the judge; per sample of
        ``related``: log p(tokens | <|endoftext|>) under the judge and the sentence vector [len(related),
        n_embd] under the model, read after <|endoftext|>).  Rows that fit in n_ctx go into one plan of
        batches (when the judge is the model, a relation sample's score row gives its vector too); longer
        ones are scored with ``tasks.score``'s sliding window."""
        eos, n_ctx = self.enc.eos_id, self.model.hparams.n_ctx
        own = self.judge is self.model
        lp = [0.0] * len(flat)
        lp0 = [0.0] * len(related)
        vectors = np.zeros((len(related), self.model.hparams.n_embd), np.float32)
        rows: List[Tuple[List[int], int]] = []      # score rows under the judge
        where: List[Tuple[List[float], int]] = []   # where each row's sum goes
        vector_of: Dict[int, int] = {}              # score row -> related sample whose vector it gives
        vector_rows: List[List[int]] = []           # read after <|endoftext|> under the model
        vector_at: List[int] = []
        long_rows: List[Tuple[List[int], int, List[float], int]] = []  # (sequence, tail, target, k)
        for k, (c, j) in enumerate(flat):
            x = ids[c][j]
            if not x or drawn[c][j] is not None:
                lp[k] = float(drawn[c][j][1]) if x else 0.0
                continue
            ctx = self.context_ids[c]
            if len(ctx) + len(x) <= n_ctx:
                rows.append((ctx + x, len(ctx)))
                where.append((lp, k))
            else:
                long_rows.append((ctx + x, len(x), lp, k))
        for r, (c, j) in enumerate(related):
            x = ids[c][j]
            fits = 1 + len(x) <= n_ctx
            if fits:
                if own:
                    vector_of[len(rows)] = r
                rows.append(([eos] + x, 1))
                where.append((lp0, r))
            else:
                long_rows.append(([eos] + x, len(x), lp0, r))
            if not (own and fits):
                vector_rows.append(([eos] + x)[:n_ctx])
                vector_at.append(r)
        pooling, starts = self.config.pooling, [1] * len(vector_rows)
        if own:  # one plan: the score rows' vectors first, then the vector rows'
            scores, vecs = forward_rows(self.model, rows, vector_rows, pooling=pooling, vector_from=starts)
            first = len(rows)
        else:
            scores, _ = forward_rows(self.judge, rows)
            _, vecs = forward_rows(self.model, (), vector_rows, pooling=pooling, vector_from=starts)
            first = 0
        for i, r in vector_of.items():
            vectors[r] = vecs[i]
        for i, r in enumerate(vector_at):
            vectors[r] = vecs[first + i]
        for (target, k), row in zip(where, scores):
            target[k] = float(np.sum(row, dtype=np.float64))
        if long_rows:
            for (_, _, target, k), row in zip(long_rows, self._score([r[0] for r in long_rows],
                                                                     [r[1] for r in long_rows])):
                target[k] = float(np.sum(row, dtype=np.float64))
        return lp, lp0, vectors

    def _score(self, sequences: List[List[int]], tails: List[int]) -> List[np.ndarray]:
        """Log-probabilities of the last ``tails[i]`` tokens of each sequence under the judge."""
        from ..score import score_sequences

        out: List[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
        todo = [i for i, n in enumerate(tails) if n > 0]
        for k, lp in score_sequences(self.judge, [sequences[i] for i in todo]):  # (windowed past n_ctx)
            i = todo[k]
            out[i] = lp[len(lp) - tails[i]:]
        return out

    def _read_after_eos(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Sentence vectors [len(id_lists), n_embd] of texts read after <|endoftext|> (their first n_ctx - 1
        tokens), as ``cosine`` and MAUVE read the samples."""
        eos, n_ctx = self.enc.eos_id, self.model.hparams.n_ctx
        rows = [([eos] + list(x or [eos]))[:n_ctx] for x in id_lists]
        _, vectors = forward_rows(self.model, (), rows, pooling=self.config.pooling, vector_from=[1] * len(rows))
        return vectors

    def context_vectors(self) -> np.ndarray:
        if self._context_vectors is None:
            self._context_vectors = self._read_after_eos(self.context_ids)
        return self._context_vectors

    def reference_pass(self) -> Tuple[List[List[int]], List[np.ndarray], np.ndarray]:
        """The reference texts' tokens, their log-probabilities given <|endoftext|> under the judge and
        their sentence vectors under the model (read after <|endoftext|>): one plan of forward passes when
        the judge is the model and every text fits in n_ctx, computed once."""
        if self._reference_pass is None:
            eos, n_ctx = self.enc.eos_id, self.model.hparams.n_ctx
            ids = [list(self.enc.encode(t)) for t in self.reference]
            if self.judge is self.model and all(0 < len(x) < n_ctx for x in ids):
                plain, vectors = forward_rows(self.model, [([eos] + x, 1) for x in ids],
                                              pooling=self.config.pooling)
            else:
                plain = self._score([[eos] + x for x in ids], [len(x) for x in ids])
                vectors = self._read_after_eos(ids)
            self._reference_pass = (ids, plain, vectors)
        return self._reference_pass

    def reference_vectors(self) -> np.ndarray:
        return self.reference_pass()[2]

    def _mauve(self, features: np.ndarray) -> Optional[float]:
        q = self.reference_vectors()
        if len(features) < 2 or len(q) < 2:
            return None
        return M.mauve(features, q, seed=self.config.seed)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _Clock:
    """Seconds spent in each part of the metrics (for benchmarks)."""

    def __init__(self):
        self.laps: Dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self._t = now


def _state_name(setting: Setting) -> str:
    return hashlib.sha256(setting.key.encode("utf-8")).hexdigest()[:16] + ".json"


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, ensure_ascii=False) + "\n")


def csv_columns(rows: Sequence[dict]) -> List[str]:
    axes = []
    for r in rows:
        for k in r["values"]:
            if k not in axes:
                axes.append(k)
    cols = ["setting", "family", *axes, "bucket", "contexts", "samples"]
    for m in METRICS:
        cols += [m, m + "_low", m + "_high"]
    return cols


def to_csv(rows: Sequence[dict]) -> str:
    """The rows as CSV: one column per swept control, then each metric with its interval."""
    buf = io.StringIO()
    cols = csv_columns(rows)
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        flat = {k: v for k, v in r.items() if k != "values"}
        for k, v in r["values"].items():
            flat[k] = "|".join(map(str, v)) if isinstance(v, list) else v
        w.writerow({c: ("" if flat.get(c) is None else flat.get(c)) for c in cols})
    return buf.getvalue()
