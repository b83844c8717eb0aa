"""gpt2-sweep.py: a grid of sampling settings, each decoding the same contexts with the same seeds; the
text of each measured (repetition, diversity, fluency, relation to the context, MAUVE against a
reference); results.jsonl/.csv, plots and report.html in --output.  The library: tasks/sweep/."""
from __future__ import annotations

import argparse
import sys

from . import common, flags, io
from .errors import ArgumentParser, UsageError


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-sweep.py",
        description="Sweep sampling settings (top_k, top_p, temperature and every other generation control) "
                    "over the same contexts and seeds, and measure the text: rep-n, diversity, distinct-n, "
                    "Self-BLEU, loops, Zipf coefficient, length, perplexity, PMI with the context, cosine, "
                    "MAUVE against --reference; per context-length bucket, with bootstrap intervals.",
        epilog="Example: python gpt2-sweep.py --model gpt2ja-medium --contexts contexts.txt --reference human.txt "
               "--grid 'top_k=1,5,10,20,40,80' --grid 'top_p=0.8,0.9,0.95' --grid 'temperature=0.7,1.0' "
               "--num_generate 8 --max_tokens 128 --seed 1 --output sweep/   (see docs/sweep.md)")
    flags.add_model_flags(p)
    flags.add(p, "num_generate", "max_tokens", "max_length", "seed", "batch_size", "progress",
              num_generate={"default": 4, "help": "samples per context and setting (default %(default)s)"},
              max_tokens={"default": 64, "type": flags.positive_int,
                          "help": "tokens per sample at most (default %(default)s)"},
              seed={"default": 1, "help": "random seed: every setting draws sample i of context j from the same "
                                          "stream (default %(default)s)"},
              batch_size={"help": "samples decoded together, from as many contexts as it takes (default "
                                  "%(default)s)"})
    p.add_argument("--contexts", metavar="FILE", required=True,
                   help="one context per line (FILE or '-' for stdin); an empty line continues <|endoftext|>")
    p.add_argument("--grid", metavar="NAME=V1,V2,...", action="append", required=True,
                   help="an axis of settings over a generation control (any field of GenerateOptions: top_k, top_p, "
                        "temperature, min_length, ... and every new control); repeat for more axes")
    p.add_argument("--cross", action="store_true",
                   help="the settings are the product of the axes (default: each axis is its own family, "
                        "changing one control of the defaults at a time)")
    p.add_argument("--set", metavar="NAME=VALUE", action="append", default=[], dest="fixed",
                   help="a control fixed for every setting (e.g. min_length=16; default: gpt2-generate.py's "
                        "defaults, top_k 40); repeatable")
    p.add_argument("--reference", metavar="FILE", default=None,
                   help="human text, one text per line: its own statistics as a 'reference' row, and MAUVE")
    p.add_argument("--judge", metavar="MODEL", default=None,
                   help="the model that scores perplexity and PMI (a directory or released name with the same "
                        "vocabulary; default: the generating model)")
    p.add_argument("--output", metavar="DIR", required=True,
                   help="directory for results.jsonl, results.csv, plots/ and report.html (and the finished "
                        "settings, settings/, that --resume reuses)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --output: finished "
                                                          "settings are not computed again")
    p.add_argument("--buckets", metavar="N,N,...", default="16,64,256",
                   help="context-length bucket edges in tokens (default %(default)s: 1-15, 16-63, 64-255, 256+)")
    p.add_argument("--resamples", type=flags.positive_int, default=1000, metavar="N",
                   help="bootstrap resamples for the intervals (default %(default)s)")
    p.add_argument("--relation_samples", metavar="N|all", type=_relation_samples, default=1,
                   help="samples of each context that PMI, cosine and MAUVE read (a second forward pass over each, "
                        "about a quarter of its generation's cost): the first N that hold a token, or all "
                        "(default %(default)s)")
    p.add_argument("--engine", choices=("auto", "numpy", "tf", "onnx"), default="auto",
                   help="decoding engine, as gpt2-generate.py's (default auto)")
    return p


def _relation_samples(text: str):
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a count of samples or 'all', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (or all), got {n}")
    return n


def _buckets(text: str):
    try:
        edges = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--buckets expects increasing token counts like 16,64,256, got {text!r}") from None
    if not edges or list(edges) != sorted(set(edges)) or edges[0] < 1:
        raise UsageError(f"--buckets expects increasing positive token counts like 16,64,256, got {text!r}")
    return edges


def _read(path: str, what: str, keep_empty: bool):
    lines = [line for _, line in io.read_lines(path)]
    if not keep_empty:
        lines = [x for x in lines if x.strip()]
    if not lines:
        raise UsageError(f"{what} {path} holds no text")
    return lines


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.contexts == "-" and args.reference == "-":
        raise UsageError("stdin cannot be both the contexts and the reference")
    # Everything a user can get wrong is checked before a model is loaded.
    from tasks.generate import GenerateOptions
    from tasks.sweep.grid import parse_axis, settings as make_settings, with_fixed
    from tasks.sweep.run import SweepConfig

    axes = [parse_axis(spec) for spec in args.grid]
    config = SweepConfig(num=args.num_generate, seed=args.seed, max_tokens=args.max_tokens,
                         max_length=args.max_length, batch_size=args.batch_size, buckets=_buckets(args.buckets),
                         resamples=args.resamples, relation_samples=args.relation_samples)
    base = with_fixed(GenerateOptions(top_k=40, seed=config.seed, max_tokens=config.max_tokens,
                                      max_length=config.max_length), args.fixed)
    chosen = make_settings(axes, args.cross, base)
    contexts = _read(args.contexts, "--contexts", keep_empty=True)
    reference = _read(args.reference, "--reference", keep_empty=False) if args.reference is not None else None
    import os

    if os.path.exists(os.path.join(args.output, "run.json")) and not args.resume:
        raise UsageError(f"--output {args.output} already holds a sweep: add --resume to continue it, "
                         "or choose another directory")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} is not a directory")

    from tasks.sweep.report import write_report
    from tasks.sweep.run import Sweep

    enc = common.load_encoder(args)
    m = common.load_model(args, enc)
    judge = None
    if args.judge is not None and args.judge != args.model:  # (the same model: no second copy, no second pass)
        jargs = argparse.Namespace(**{**vars(args), "model": args.judge})
        judge = common.load_model(jargs, enc)
    sweep = Sweep(m, enc, contexts, config, judge=judge, reference=reference, engine=args.engine,
                  model_name=args.model, judge_name=args.judge or args.model, base=base)
    total = len(chosen) * len(contexts) * config.num
    bar = io.progress(total=total, desc="sweep", unit="sample", force=args.progress)

    def log(line: str) -> None:
        if line.startswith("["):
            bar.set_description_str(line.split("]", 1)[0] + "]", refresh=False)
        if line.startswith("resuming"):
            bar.total = total  # finished settings are not counted again
        bar.write(f"gpt2-sweep.py: {line}", file=sys.stderr)

    try:
        rows = sweep.run(chosen, args.output, resume=args.resume, progress=bar.update, log=log)
    finally:
        bar.close()
    notes = [f"model {args.model}; judge {args.judge or args.model}; {len(contexts)} contexts x "
             f"{config.num} samples, seed {config.seed}, max_tokens {config.max_tokens}"
             + "".join(f", {spec}" for spec in args.fixed) + "; settings: "
             f"{', '.join(s.label for s in chosen)}" + (f"; reference {args.reference}" if reference else "")]
    write_report(rows, args.output, notes=notes)
    sys.stderr.write(f"gpt2-sweep.py: wrote {args.output}/results.jsonl, results.csv, plots/ and report.html "
                     f"(generation {sweep.timings['generate']:.1f} s, metrics {sweep.timings['metrics']:.1f} s)\n")
    common.report_end(args, sweep.generator.stats.line())
    return 0
