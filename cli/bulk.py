"""gpt2-bulk.py: vectors, scores and samples of many lines on a Ray cluster, as Parquet files.

    gpt2-bulk.py transform --model M --input PATHS... --output DIR [--pooling --layer --normalize --precision]
    gpt2-bulk.py score     --model M --input PATHS... --output DIR [--exclude-end --stride --tokens --precision]
    gpt2-bulk.py generate  --model M --contexts PATHS... --output DIR --num_generate N --seed S [...]

DIR gets one ``part-NNNNN.parquet`` per shard of the input (written atomically
when the shard is done) and ``_job.json`` (what the job is; ``--resume``
checks it and computes only the shards whose file is missing).  Ray is
imported only here (and in tasks.bulk), never by the single-machine tools.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from . import common, flags, io
from .errors import ArgumentParser, UsageError

JOB_FILE = "_job.json"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-bulk.py",
        description="Vectors, scores or samples of many lines on a Ray cluster, written as Parquet files "
                    "(one per shard of the input), with the numbers of gpt2-transform.py, gpt2-score.py "
                    "and gpt2-generate.py.",
        epilog="Example: python gpt2-bulk.py transform --model gpt2ja-small --input corpus.txt --output vectors/ "
               "--workers 4",
    )
    sub = p.add_subparsers(dest="command", metavar="{transform,score,generate}")
    sub.required = True

    def common_flags(q, source: str):
        flags.add_model_flags(q, threads={"help": "CPU threads of each worker (actor), at most its node's CPUs; "
                                                          "default 1", "default": 1, "type": flags.positive_int})
        q.add_argument(f"--{source}", nargs="+", metavar="PATH", required=True,
                       help="input files (local paths, or URIs pyarrow reads: s3://, gs://, hdfs://), one text "
                            "per line; lines are numbered from 0 across the files in turn")
        q.add_argument("--output", metavar="DIR", required=True,
                       help="directory for the Parquet files (one per shard) and _job.json")
        q.add_argument("--address", default=None,
                       help="Ray cluster to use: 'auto' (the running cluster of this machine) or HOST:PORT; "
                            "default: start a local cluster for this job, listening on 127.0.0.1 only")
        q.add_argument("--workers", type=flags.positive_int, default=1, metavar="N",
                       help="actors (each loads the model once), at most one per shard to do and, on a local "
                            "cluster, as many as its CPUs (over --threads) and memory hold (a note says when "
                            "it is lowered); default %(default)s")
        q.add_argument("--shard_lines", type=flags.positive_int, default=None, metavar="N",
                       help="input lines per shard: the unit of work, retry and output file (default 2000)")
        q.add_argument("--resume", action="store_true",
                       help="DIR holds an unfinished run of the same job: compute only the shards whose file "
                            "is missing")
        flags.add(q, "progress")

    t = sub.add_parser("transform", help="sentence vectors (gpt2-transform.py)",
                       description="Columns: line, text, vector (fixed-size list of float32).")
    common_flags(t, "input")
    flags.add(t, "pooling", "layer", "normalize", "batch_tokens", "precision", batch_tokens={"default": 4096})

    s = sub.add_parser("score", help="sentence scores (gpt2-score.py)",
                       description="Columns: line, text (stripped), logprob, tokens, perplexity "
                                   "(+ token_logprobs with --tokens); an empty line has logprob null, tokens 0.")
    common_flags(s, "input")
    flags.add(s, "tokens", "exclude_end", "stride", "batch_tokens", "precision")

    g = sub.add_parser("generate", help="samples (gpt2-generate.py --contexts)",
                       description="Columns: line, index, context, text: sample i of line j is what "
                                   "gpt2-generate.py --seed S gives for context j.")
    common_flags(g, "contexts")
    flags.add(g, "num_generate", "top_k", "top_p", "temperature", "max_length", "max_tokens", "stop", "min_length",
              "seed", "batch_size", min_length={"type": int})
    flags.add(g, "quantize", *flags.SAMPLING_FLAGS)
    g.add_argument("--engine", choices=("auto", "numpy", "tf", "onnx"), default="auto",
                   help="decoding engine (as gpt2-generate.py)")
    return p


# --------------------------------------------------------------------------- on the workers


def _spec(args) -> dict:
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    lora = getattr(args, "lora", None)
    lora = os.path.abspath(lora) if lora and os.path.exists(lora) else lora
    return {"model": model, "lora": lora, "vocab": args.vocab, "gpu": args.gpu, "threads": args.threads,
            "verbose": args.verbose, "no_download": args.no_download}


def load_on_worker(spec: dict):
    """(model, encoder) as the single-machine tools load them; runs in each actor."""
    args = argparse.Namespace(**spec)
    enc = common.load_encoder(args)
    return common.load_model(args, enc), enc


def check_on_worker(spec: dict, task=None) -> str:
    """The model directory this node resolves --model to (downloading a released model
    into this node's cache when allowed), or a ModelError; with ``task``, an OptionError
    for options the model cannot take: before any actor starts."""
    import hub
    from model.checkpoint import find_checkpoint

    directory = hub.resolve_model(spec["model"], download=not spec["no_download"], progress=False)
    find_checkpoint(directory)
    if task is not None:
        from model.checkpoint import open_checkpoint

        task.check(open_checkpoint(directory)[1])
    return str(directory)


# --------------------------------------------------------------------------- the driver


def _task(args):
    from tasks import bulk

    if args.command == "transform":
        return bulk.TransformTask(args.pooling, args.layer, args.normalize, args.batch_tokens, args.precision)
    if args.command == "score":
        return bulk.ScoreTask(args.exclude_end, args.stride, args.tokens, args.batch_tokens, args.precision)
    from . import generate

    generate._check(argparse.Namespace(**{**vars(args), "context": None, "stream": False, "format": "jsonl",
                                          "output_file": ""}))
    num = args.num_generate
    return bulk.GenerateTask(generate.options_from(args), num, batch_size=args.batch_size, engine=args.engine,
                             quantize=None if args.quantize == "none" else args.quantize)


def _job_description(args, task, shards) -> dict:
    return {"command": args.command, "model": args.model, "options": task.options(),
            "inputs": args.input if args.command != "generate" else args.contexts,
            "shards": [[s.path, s.start, s.end, s.first_line, s.lines] for s in shards]}


def _note(message: str) -> None:
    sys.stderr.write(f"gpt2-bulk.py: note: {message}\n")
    sys.stderr.flush()


def _part_problem(path: str, shard, rows_per_line: int) -> str | None:
    """Why the kept file ``path`` is not the finished output of ``shard`` (None when it is): it must
    read back whole as Parquet, with the shard's rows and lines."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # ArrowInvalid, OSError...: truncated, garbage, unreadable
        return " ".join(str(e).split())[:200] or type(e).__name__
    want = shard.lines * rows_per_line
    if table.num_rows != want:
        return f"{table.num_rows} rows instead of {want}"
    if "line" not in table.column_names:
        return "no line column"
    lines = table["line"].to_pylist()
    if lines and (min(lines) != shard.first_line or max(lines) != shard.first_line + shard.lines - 1):
        return f"lines {min(lines)}..{max(lines)} instead of {shard.first_line}..{shard.first_line + shard.lines - 1}"
    return None


def _prepare_output(args, job: dict, shards, rows_per_line: int = 1) -> list:
    """Create DIR, check it, write or check _job.json: the shards still to do.

    With --resume, every kept ``part-NNNNN.parquet`` is read back and checked against its shard
    (rows, lines); a damaged one (truncated, garbage) is removed, with a note, and done again.  A
    ``_job.json`` beside no part file holds nothing to keep (a job that failed or was stopped
    before its first shard was written): the new job replaces it, --resume or not."""
    out = args.output
    try:
        os.makedirs(out, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    path = os.path.join(out, JOB_FILE)
    by_name = {s.name(): s for s in shards}
    present = sorted(n for n in os.listdir(out) if n.startswith("part-") and n.endswith(".parquet"))
    if present:
        if not args.resume:
            raise UsageError(f"{out} holds the output of a job: give --resume to finish it, or another directory")
        try:
            with open(path, encoding="utf-8") as f:
                before = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot resume: {path} cannot be read ({e})") from None
        if before != job:
            raise UsageError(f"cannot resume: {out} holds another job (other inputs, model or options)")
        strays = [n for n in present if n not in by_name]
        if strays:
            raise UsageError(f"cannot resume: {out} holds files of no shard of this job ({strays[0]})")
        kept = set()
        for name in present:
            problem = _part_problem(os.path.join(out, name), by_name[name], rows_per_line)
            if problem is None:
                kept.add(name)
                continue
            _note(f"{name} is damaged ({problem}): it is made again")
            try:
                os.unlink(os.path.join(out, name))
            except OSError as e:
                raise UsageError(f"cannot remove {os.path.join(out, name)}: {e.strerror or e}") from None
        return [s for s in shards if s.name() not in kept]
    from util.files import atomic_file

    try:
        with atomic_file(path, "w") as f:
            json.dump(job, f, ensure_ascii=False, indent=1)
            f.write("\n")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    return list(shards)


#: Memory an actor takes besides its model's weights (Python, TensorFlow, Ray): measured about
#: 1.2 GB each for the tiny model (8 actors, 9.7 GB).
ACTOR_BASE_MEMORY = 5 * 2 ** 28  # 1.25 GiB


def _model_bytes(model: str) -> int:
    """The checkpoint data files' size of --model when it is on this machine, else 0."""
    import glob

    import hub

    directory = hub.model_path(model)
    try:
        return sum(os.path.getsize(f) for f in glob.glob(os.path.join(glob.escape(str(directory)), "*.data-*")))
    except OSError:
        return 0


def cap_workers(workers: int, threads: int, shards: int, cpus: int, memory, model_bytes: int = 0):
    """(workers, notes): ``workers`` lowered to what the job can use -- one actor per shard to do,
    ``cpus // threads`` actors, and the actors that ``memory`` bytes hold (None: unknown) at
    ``ACTOR_BASE_MEMORY`` + twice the weights each -- at least 1."""
    notes = []
    if workers > shards:
        notes.append(f"--workers {workers} lowered to {shards}: the job has {shards} shard(s) to do")
        workers = shards
    fit = max(1, cpus // max(1, threads))
    if workers > fit:
        notes.append(f"--workers {workers} lowered to {fit}: {cpus} CPU(s) for actors of --threads {threads}")
        workers = fit
    if memory is not None:
        each = ACTOR_BASE_MEMORY + 2 * model_bytes
        fit = max(1, int(memory // each))
        if workers > fit:
            notes.append(f"--workers {workers} lowered to {fit}: {memory / 2 ** 30:.1f} GiB available, about "
                         f"{each / 2 ** 30:.1f} GiB per actor")
            workers = fit
    return max(1, workers), notes


def _check_address(address: str, timeout: float) -> None:
    """UsageError unless HOST:PORT (or ray://HOST:PORT) accepts a TCP connection within ``timeout``
    seconds: Ray itself would retry an unreachable address for minutes."""
    import socket

    target = address.split("://", 1)[1] if "://" in address else address
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return  # not HOST:PORT ('auto'): Ray says what is wrong at once
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, (socket.timeout, TimeoutError)) else (e.strerror or str(e))
        raise UsageError(f"cannot reach the Ray cluster {address}: {reason} "
                         f"(tried for up to {timeout:g} s)") from None


#: How long --address HOST:PORT may take to accept a connection.
CONNECT_TIMEOUT = 10.0


def _start_ray(args):
    """Connect to --address, or start a local cluster listening on 127.0.0.1: True if started here."""
    import logging

    if args.address is None:
        # Ray would otherwise advertise the machine's outside address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not args.verbose:
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
        # Ray's C++ logs error-looking lines on a healthy job ("core_worker.cc: ... max_restarts > 0")
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if args.address is not None:
        _check_address(args.address, CONNECT_TIMEOUT)
    import ray

    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.ERROR)
    quiet = {"logging_level": logging.ERROR, "log_to_driver": bool(args.verbose), "include_dashboard": False}
    try:
        with _stderr_silenced(not args.verbose):
            _init_ray(ray, args, quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot reach the Ray cluster {args.address or '(local)'}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    # Ray's driver takes SIGTERM for itself (exit status 15, its C++ stack dump): give it back to the
    # tool's handler, which unwinds (ray.shutdown) and exits 143 quietly.
    import signal

    from .errors import _on_sigterm

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    return True


def _init_ray(ray, args, quiet: dict) -> None:
    if args.address is None:
        cpus = max(os.cpu_count() or 1, args.workers * args.threads + 1)
        # "local": a new cluster even when RAY_ADDRESS names a running one (that is --address's job)
        ray.init(address="local", num_cpus=cpus, _node_ip_address="127.0.0.1", **quiet)
    else:
        quiet.pop("include_dashboard")
        ray.init(address=args.address, **quiet)


class _stderr_silenced:
    """While Ray starts (``quiet``): file descriptor 2 points at /dev/null, so that the lines Ray's
    C++ core prints there at start-up ("logging.cc: Set ray log level ...") and the processes of a
    local cluster it starts (which inherit it) say nothing on the tool's stderr.  Failures still
    reach the user: ray.init raises, and the tool reports that in one line."""

    def __init__(self, quiet: bool):
        self.quiet, self.saved = quiet, None

    def __enter__(self):
        if self.quiet:
            try:
                sys.stderr.flush()
                self.saved = os.dup(2)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
            except (OSError, ValueError, AttributeError):
                self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


def _runtime_env() -> dict:
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in ("GPT2JA_VOCAB", "GPT2JA_HOME", "GPT2JA_OFFLINE", "GPT2JA_MODEL_URLS"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return {"env_vars": env}


def _preflight(spec: dict, runtime_env: dict, task) -> None:
    """Every node with CPUs finds the model, before actors start (a clear error instead
    of actors that die loading it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0, max_retries=0, runtime_env=runtime_env)(check_on_worker)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    refs = [(n, check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
             .remote(spec, task if i == 0 else None)) for i, n in enumerate(nodes)]
    for node, ref in refs:
        try:
            ray.get(ref)
        except Exception as e:  # RayTaskError wrapping the worker's ModelError or OptionError
            line = _cause_line(e)
            raise UsageError(line if line.startswith("--") else
                             f"on node {node.get('NodeManagerAddress', '?')}: {line}") from None


def _cause_line(e: BaseException) -> str:
    """The one line that says why a Ray task failed: the user error it wraps, else the
    last ``SomeError: message`` line of its report."""
    import re

    from tasks.bulk import BulkError

    from .errors import _user_errors, message

    known = _user_errors() + (BulkError,)
    seen = set()
    stack = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        inner = getattr(cur, "cause", None)  # a RayTaskError: the worker's own exception
        if isinstance(inner, BaseException) and inner is not cur:
            stack.append(inner)
            continue
        if isinstance(cur, known):
            return message(cur)
        stack += [cur.__cause__, cur.__context__]
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    # Ray Data's wrappers may lose the exception itself, not its report: a user error named there first.
    names = "|".join(cls.__name__ for cls in known)
    found = [line.strip() for line in text.splitlines() if re.match(rf"\s*[\w.]*\b({names}): ", line)]
    found = found or [line.strip() for line in text.splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", line)]
    line = " ".join((found[-1] if found else text).split())[:400]
    option = re.match(r"[\w.]*OptionError: (\w+) (.*)", line)  # the flag, as the other tools say it
    return f"--{option.group(1)} {option.group(2)}" if option else line


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from tasks import bulk

    if getattr(args, "precision", "fp32") == "bf16":
        import model
        from model import device
        # the workers' device, as they will select it (decided here, once, without TensorFlow)
        gpu = model.parse_gpu(args.gpu) >= 0 and device.nvidia_present()
        flags.settle_precision(args, "/GPU:0" if gpu else "/CPU:0")
    task = _task(args)
    inputs = args.contexts if args.command == "generate" else args.input
    try:
        shards = bulk.plan_shards(inputs, args.shard_lines or bulk.SHARD_LINES)
    except bulk.BulkError as e:
        raise UsageError(str(e)) from None
    job = json.loads(json.dumps(_job_description(args, task, shards)))  # as it reads back (tuples -> lists)
    todo = _prepare_output(args, job, shards, task.rows_per_line)
    total = sum(s.lines for s in shards)
    if not todo:
        common.log(args, f"nothing to do: {args.output} has every shard")
        return 0

    import time
    import warnings

    if not args.verbose:  # Ray's own warnings (its tuning advice) are not the user's business
        warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    if args.address is None:
        from util.system import available_memory

        workers, notes = cap_workers(args.workers, args.threads, len(todo), os.cpu_count() or 1,
                                     available_memory(), _model_bytes(args.model))
    else:
        workers, notes = cap_workers(args.workers, args.threads, len(todo), 1 << 30, None)
    args.workers = workers
    started = _start_ray(args)
    try:
        if args.address is not None:
            import ray

            workers, more = cap_workers(workers, args.threads, len(todo),
                                        int(ray.cluster_resources().get("CPU", 1)), None)
            notes += more
        for note in notes:
            _note(note)
        args.workers = workers
        spec = _spec(args)
        runtime_env = _runtime_env()
        _preflight(spec, runtime_env, task)
        from util.files import atomic_file

        report = bulk.JobReport(nodes={})
        done_lines = total - sum(s.lines for s in todo)
        bar = io.progress(total=total, desc=args.command, unit="line", force=args.progress)
        bar.update(done_lines)
        t0 = time.perf_counter()
        try:
            import pyarrow.parquet as pq

            for shard, table in bulk.run_job(todo, task, functools.partial(load_on_worker, spec),
                                             workers=args.workers, threads=args.threads,
                                             on_warning=common.warn, report=report, runtime_env=runtime_env):
                path = os.path.join(args.output, shard.name())
                try:
                    with atomic_file(path, "wb") as f:
                        pq.write_table(table, f)
                except OSError as e:
                    raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
                bar.update(shard.lines)
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise UsageError(f"the job failed: {_cause_line(e)}") from None
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        lines = sum(s.lines for s in todo)
        common.log(args, f"{args.command}: {lines} lines in {seconds:.2f} s ({lines / max(seconds, 1e-9):.1f} lines/s); "
                         f"nodes: " + ", ".join(f"{node} ({n} rows)" for node, n in sorted(report.nodes.items())))
    finally:
        if started:
            _shutdown_ray()
    return 0


def _shutdown_ray() -> None:
    """``ray.shutdown()``, not cut short by a SIGTERM: a shutdown interrupted half way leaves Ray's own
    exit hook to run on a half torn-down core worker, which can end the process with status 1 and
    nothing said.  A SIGTERM arriving meanwhile is taken up once the shutdown is done (exit 143)."""
    import signal

    import ray

    from .errors import Terminated, _on_sigterm

    got = []
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    except ValueError:  # not the main thread
        previous = None
    try:
        ray.shutdown()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if got and previous is _on_sigterm:
        raise Terminated()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
