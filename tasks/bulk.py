"""Bulk jobs on a Ray cluster: vectors, scores and samples of many lines, written as Parquet.

    from tasks.bulk import plan_shards, TransformTask, run_job
    shards = plan_shards(["a.txt", "s3://bucket/b.txt"], shard_lines=2000)
    for shard, table in run_job(shards, TransformTask(pooling="last"), load, workers=2, threads=1): ...

The input is the lines of the input files taken in turn (as ``read_lines``
gives them: strict UTF-8, ``\\n`` or ``\\r\\n`` removed); a line's number is
its 0-based index in that sequence (so line N is row N of what the
single-machine tool prints for the same lines, and context N of
gpt2-generate.py).  ``plan_shards`` reads the files once on the driver
(counting lines, checking UTF-8) and cuts them into shards of at most
``shard_lines`` lines: byte ranges of one file.  A shard is the unit of
work, of retry and of output (one Parquet file each).

``run_job`` runs ``Dataset.map_batches`` over an actor pool (``workers``
actors of ``threads`` CPUs each, spread over the nodes); each actor loads the
model once (``load()``, given by the caller) and turns whole shards into
Arrow tables with the same ``tasks`` classes the single-machine tools use
(``Vectorizer``, ``Scorer``, ``Generator``), so the numbers agree by
construction.  It yields (shard, table) as shards finish, in any order; an
actor that dies has its shard done again by another (Ray Data restarts
actors and retries their work), and a shard's rows are kept exactly once.

Input paths are local paths or any URI pyarrow's filesystems take
(``s3://``, ``gs://``, ``hdfs://``): every node must be able to read them.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

#: Lines per shard by default.
SHARD_LINES = 2000
_READ_BLOCK = 1 << 20


class BulkError(Exception):
    """An input that cannot be read, or a job that cannot run: one line for the user."""


# --------------------------------------------------------------------------- input


def _filesystem(path: str):
    """(pyarrow filesystem, path inside it) of a local path or a URI."""
    from pyarrow import fs

    if "://" in path:
        try:
            return fs.FileSystem.from_uri(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad URI
            raise BulkError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    return fs.LocalFileSystem(), os.path.abspath(path)


@dataclass(frozen=True)
class Shard:
    """Lines ``first_line .. first_line + lines - 1`` of the input: bytes [start, end) of ``path``."""

    number: int
    path: str
    start: int
    end: int
    first_line: int
    lines: int

    def name(self) -> str:
        return f"part-{self.number:05d}.parquet"


def _raw_lines(stream) -> Iterator[Tuple[int, bytes]]:
    """(offset after the line, the line without its terminator) of a binary stream.  Time linear in
    the input however long its lines: a line's pieces are joined once, when its end is found (a
    90 MB line used to be copied again with every 1 MB block read)."""
    offset = 0
    pending: List[bytes] = []  # the pieces of the unfinished line
    while True:
        block = stream.read(_READ_BLOCK)
        if not block:
            break
        if b"\n" not in block:
            pending.append(block)
            continue
        lines = block.split(b"\n")
        last = lines.pop()
        if pending:
            pending.append(lines[0])
            lines[0] = b"".join(pending)
            pending = []
        for raw in lines:
            offset += len(raw) + 1
            yield offset, raw[:-1] if raw.endswith(b"\r") else raw
        if last:
            pending.append(last)
    if pending:
        rest = b"".join(pending)
        offset += len(rest)
        yield offset, rest


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BulkError(f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def plan_shards(paths: Sequence[str], shard_lines: int = SHARD_LINES) -> List[Shard]:
    """The shards of the input files: each file is read once, its lines counted
    and checked to be UTF-8, and cut into shards of at most ``shard_lines`` lines."""
    if shard_lines < 1:
        raise ValueError("shard_lines must be at least 1")
    shards: List[Shard] = []
    line = 0
    for path in paths:
        filesystem, inner = _filesystem(path)
        try:
            stream = filesystem.open_input_stream(inner)
        except (OSError, Exception) as e:
            raise BulkError(f"cannot read {path}: {_reason(e)}") from None
        try:
            start, count, number = 0, 0, 0
            for end, raw in _raw_lines(stream):
                number += 1
                _decode(raw, f"{path}, line {number}")
                count += 1
                if count == shard_lines:
                    shards.append(Shard(len(shards), path, start, end, line, count))
                    line += count
                    start, count = end, 0
            if count:
                shards.append(Shard(len(shards), path, start, end, line, count))
                line += count
        except OSError as e:
            raise BulkError(f"cannot read {path}: {_reason(e)}") from None
        finally:
            stream.close()
    return shards


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(text.split())


def read_shard(shard: Shard) -> List[str]:
    """The lines of a shard (on a worker)."""
    filesystem, inner = _filesystem(shard.path)
    try:
        with filesystem.open_input_file(inner) as f:
            f.seek(shard.start)
            data = f.read(shard.end - shard.start)
    except OSError as e:
        raise BulkError(f"cannot read {shard.path} on a worker: {_reason(e)}") from None
    lines = data.split(b"\n")
    last = lines.pop()  # after the last line break: b"" or a last line without one
    lines = [raw[:-1] if raw.endswith(b"\r") else raw for raw in lines]
    if last:
        lines.append(last)
    texts = [_decode(raw, f"{shard.path}, line {shard.first_line + i + 1}") for i, raw in enumerate(lines)]
    if len(texts) != shard.lines:
        raise BulkError(f"{shard.path} changed while the job ran (shard {shard.number} has {len(texts)} lines, "
                        f"not {shard.lines})")
    return texts


# --------------------------------------------------------------------------- tasks


class Task:
    """What a job does to the lines of a shard.  ``setup`` runs once in each actor."""

    kind = ""
    rows_per_line = 1
    key = ("line",)

    def options(self) -> dict:
        return {}

    def setup(self, model, enc) -> None:
        self.model, self.enc = model, enc

    def check(self, hparams) -> None:
        """OptionError now for options the model cannot take (before actors load it):
        the constructors of the tasks classes check them against ``hparams`` alone."""
        from types import SimpleNamespace

        if type(self).setup is not Task.setup:
            copy = object.__new__(type(self))
            copy.__dict__.update(self.__dict__)
            copy.setup(SimpleNamespace(hparams=hparams), None)

    def process(self, first_line: int, texts: List[str]):
        """(pyarrow table of the shard's rows, warnings)."""
        raise NotImplementedError


def _precision_option(precision: str) -> dict:
    """The job's precision option: absent for fp32, so that a job made before --precision
    existed is still the same job (``--resume``)."""
    return {} if precision == "fp32" else {"precision": precision}


class TransformTask(Task):
    """Columns line, text, vector (fixed-size list of float32): gpt2-transform.py's vectors.
    An empty line gets <|endoftext|>'s vector (with a warning), as there."""

    kind = "transform"

    def __init__(self, pooling: str = "last", layer: int = -1, normalize: bool = False, batch_tokens: int = 4096,
                 precision: str = "fp32"):
        self.pooling, self.layer, self.normalize, self.batch_tokens = pooling, layer, normalize, batch_tokens
        self.precision = precision

    def options(self) -> dict:
        return {"pooling": self.pooling, "layer": self.layer, "normalize": self.normalize,
                **_precision_option(self.precision)}

    def setup(self, model, enc) -> None:
        from .vectors import Vectorizer

        self.vec = Vectorizer(model, enc, pooling=self.pooling, layer=self.layer, normalize=self.normalize,
                              max_tokens=self.batch_tokens, precision=self.precision)
        super().setup(self.vec.model, enc)  # (bf16: the float32 model is not kept)

    def process(self, first_line, texts):
        import pyarrow as pa

        warnings, id_lists = [], []
        n_ctx = self.model.hparams.n_ctx
        for i, text in enumerate(texts):
            ids, truncated = self.vec.ids(text)
            if truncated:
                warnings.append(f"line {first_line + i}: longer than {n_ctx} tokens; using its last {n_ctx} tokens")
            if not text:
                warnings.append(f"line {first_line + i}: empty; its vector is that of <|endoftext|>")
            id_lists.append(ids)
        vectors = self.vec.vectors_of_ids(id_lists)
        width = vectors.shape[1]
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), width)
        table = pa.table({"line": pa.array(np.arange(first_line, first_line + len(texts)), pa.int64()),
                          "text": pa.array(texts, pa.string()), "vector": column})
        return table, warnings


class ScoreTask(Task):
    """Columns line, text (stripped, as scored), logprob, tokens, perplexity, and with
    ``tokens`` token_logprobs: gpt2-score.py's numbers.  A line that is empty once
    stripped (which gpt2-score.py skips) gets a row with logprob and perplexity null and
    tokens 0, so that every input line has its row."""

    kind = "score"

    def __init__(self, exclude_end: bool = False, stride: Optional[int] = None, tokens: bool = False,
                 batch_tokens: int = 2048, precision: str = "fp32"):
        self.exclude_end, self.stride, self.tokens, self.batch_tokens = exclude_end, stride, tokens, batch_tokens
        self.precision = precision

    def options(self) -> dict:
        return {"exclude_end": self.exclude_end, "stride": self.stride, "tokens": self.tokens,
                **_precision_option(self.precision)}

    def setup(self, model, enc) -> None:
        from .score import Scorer

        self.scorer = Scorer(model, enc, exclude_end=self.exclude_end, stride=self.stride,
                             max_tokens=self.batch_tokens, precision=self.precision)
        super().setup(self.scorer.model, enc)  # (bf16: the float32 model is not kept)

    def process(self, first_line, texts):
        import pyarrow as pa

        from .score import TextScore

        stripped = [t.strip() for t in texts]
        scored = [i for i, t in enumerate(stripped) if t]
        id_lists = [self.scorer.ids(stripped[i]) for i in scored]
        results: Dict[int, TextScore] = {}
        for k, lp in self.scorer.score_token_lists(id_lists):
            results[scored[k]] = TextScore(stripped[scored[k]], id_lists[k], lp)
        logprob, count, ppl, token_rows = [], [], [], []
        for i in range(len(texts)):
            s = results.get(i)
            if s is None:
                logprob.append(None)
                count.append(0)
                ppl.append(None)
                token_rows.append([])
                continue
            logprob.append(s.logprob)
            count.append(len(s.ids))
            p = s.perplexity
            ppl.append(p if np.isfinite(p) else None)
            if self.tokens:
                token_rows.append([{"id": int(t), "token": self.enc.decode([int(t)]), "logprob": float(v)}
                                   for t, v in zip(s.ids, s.logprobs.tolist())])
        columns = {"line": pa.array(np.arange(first_line, first_line + len(texts)), pa.int64()),
                   "text": pa.array(stripped, pa.string()),
                   "logprob": pa.array(logprob, pa.float64()),
                   "tokens": pa.array(count, pa.int64()),
                   "perplexity": pa.array(ppl, pa.float64())}
        if self.tokens:
            columns["token_logprobs"] = pa.array(token_rows, TOKEN_TYPE())
        return pa.table(columns), []


def TOKEN_TYPE():
    import pyarrow as pa

    return pa.list_(pa.struct([("id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())]))


class GenerateTask(Task):
    # (check: the Generator's own rules -- min_length below n_ctx/2 -- fail the job's first shard)
    """Columns line, index, context, text: ``num`` samples of each line, sample i of
    line j being what gpt2-generate.py --seed S --contexts gives for context j
    (``Generator.generate`` with ``context_index`` = the line number).  An empty line
    is continued from <|endoftext|>, as there."""

    kind = "generate"
    key = ("line", "index")

    def __init__(self, options, num: int, batch_size: int = 16, engine: str = "auto", quantize=None):
        self.gen_options, self.num, self.batch_size, self.engine = options, num, batch_size, engine
        self.quantize = quantize
        self.rows_per_line = num

    def options(self) -> dict:
        return {**asdict(self.gen_options), "num_generate": self.num, "quantize": self.quantize}

    def setup(self, model, enc) -> None:
        from .generate import Generator

        super().setup(model, enc)
        self.generator = Generator(model, enc, engine=self.engine, quantize=self.quantize)

    def process(self, first_line, texts):
        import pyarrow as pa

        lines, index, contexts, out = [], [], [], []
        for i, text in enumerate(texts):
            samples = self.generator.generate(text, self.num, self.gen_options, context_index=first_line + i,
                                              batch_size=min(self.batch_size, self.num))
            for k, sample in enumerate(samples):
                lines.append(first_line + i)
                index.append(k)
                contexts.append(text)
                out.append(sample)
        return pa.table({"line": pa.array(lines, pa.int64()), "index": pa.array(index, pa.int32()),
                         "context": pa.array(contexts, pa.string()), "text": pa.array(out, pa.string())}), []


# --------------------------------------------------------------------------- the job


class _Worker:
    """One actor of the pool: the model loaded once, shards in, result tables out."""

    def __init__(self, load: Callable[[], tuple], task: Task):
        import ray

        model, enc = load()
        self.task = task
        self.task.setup(model, enc)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        import pyarrow as pa

        tables = []
        for row in batch.to_pylist():
            shard = Shard(**row)
            table, warnings = self.task.process(shard.first_line, read_shard(shard))
            n = table.num_rows
            table = table.append_column("_shard", pa.array([shard.number] * n, pa.int64()))
            table = table.append_column("_node", pa.array([self.node] * n, pa.string()))
            table = table.append_column("_warnings", pa.array([warnings] + [[]] * (n - 1) if n else [],
                                                               pa.list_(pa.string())))
            tables.append(table)
        return pa.concat_tables(tables)


@dataclass
class JobReport:
    """What a job did: the nodes its actors ran on (node id -> rows made there)."""

    nodes: Dict[str, int]


def run_job(shards: Sequence[Shard], task: Task, load: Callable[[], tuple], workers: int = 1,
            threads: int = 1, on_warning: Callable[[str], None] = lambda w: None,
            report: Optional[JobReport] = None, runtime_env: Optional[dict] = None) -> Iterator[Tuple[Shard, object]]:
    """(shard, pyarrow table of its rows sorted by line) for each shard, as they finish.

    Ray must be initialised.  ``load()`` runs once in each actor and gives
    (model, encoder).  A shard's rows are kept once even if a retried actor
    gives some of them twice.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    if not shards:
        return
    import warnings

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    by_number = {s.number: s for s in shards}
    items = [asdict(s) for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():  # the spreading of actors has no other spelling in Ray 2.6x
        warnings.simplefilter("ignore")
        ds = ds.map_batches(_Worker, fn_constructor_kwargs={"load": load, "task": task},
                            batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=threads, runtime_env=runtime_env,
                            ray_remote_args_fn=lambda: {"scheduling_strategy": "SPREAD"})
    got: Dict[int, List] = {}
    seen: Dict[int, set] = {}
    done = set()
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for notes in block["_warnings"].to_pylist():
            for w in notes:
                on_warning(w)
        if report is not None:
            for node, n in zip(*np.unique(np.asarray(block["_node"].to_pylist(), dtype=object).astype(str),
                                           return_counts=True)):
                report.nodes[node] = report.nodes.get(node, 0) + int(n)
        for number in np.unique(block["_shard"].to_numpy()):
            number = int(number)
            if number in done:
                continue  # a retried shard's rows given twice
            rows = block.filter(pc.equal(block["_shard"], number)).drop_columns(["_shard", "_node", "_warnings"])
            keys = list(zip(*(rows[k].to_pylist() for k in task.key)))
            keep = [i for i, k in enumerate(keys) if k not in seen.setdefault(number, set())]
            if len(keep) != rows.num_rows:
                rows = rows.take(pa.array(keep, pa.int64()))
            seen[number].update(keys[i] for i in keep)
            got.setdefault(number, []).append(rows)
            shard = by_number[number]
            if len(seen[number]) == shard.lines * task.rows_per_line:
                table = pa.concat_tables(got.pop(number))
                table = table.sort_by([(k, "ascending") for k in task.key])
                done.add(number)
                seen.pop(number)
                yield shard, table
    missing = sorted(set(by_number) - done)
    if missing:
        raise BulkError(f"the job ended without the rows of shard(s) {missing[:10]}")
