#!/usr/bin/env python3
"""gpt2-sweep.py: what its own metrics cost next to its generation (target: at most 10%).

    python bench/bench_sweep.py [--shape small] [--model DIR] [--contexts 8] [--num 4] [--max_tokens 64]
                                [--grid top_k=1,20,40] [--batch_size 16] [--reference 64] [--json FILE]

A sweep (``tasks.sweep.run.Sweep``) over --grid on the repository's contexts
(tests/data/golden/contexts.txt, cycled to --contexts), with the first --reference texts of the encoder
goldens as the reference (so MAUVE is computed), on a random-weight checkpoint of --shape
(bench/make_checkpoint.py, made under /tmp when missing) or on --model.  A first, untimed setting warms
the compiled functions up (generation, scoring, vectors).  For every timed setting: seconds of generation
and of each part of the metrics (encode the samples, score them under the judge -- with and without
their context --, sentence vectors, the text metrics, MAUVE), and the ratio metrics / generation; then
the seconds of the aggregation (bootstrap intervals, rows) and of the report (plots, report.html), which
are paid once per sweep, not per setting.  Prints a table on stdout; --json FILE writes the figures.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")

_spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(REPO, "bench", "bench_generate.py"))
bg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bg)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="small", choices=("tiny", "small", "medium"))
    p.add_argument("--model", default=None, help="a model directory instead of a random checkpoint")
    p.add_argument("--contexts", type=int, default=8)
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--grid", default="top_k=1,20,40")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--reference", type=int, default=64, help="reference texts (0: no reference, no MAUVE)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import encoder
    import model
    from tasks.sweep.grid import parse_axis, settings
    from tasks.sweep.report import write_report
    from tasks.sweep.run import Sweep, SweepConfig

    directory = args.model or f"/tmp/gpt2ja-{args.shape}-rand"
    if args.model is None:
        bg.ensure_checkpoint(args.shape, directory)
    enc = encoder.load(os.path.join(REPO, "encoder"))
    m = model.load(directory)
    golden = os.path.join(REPO, "tests", "data", "golden")
    lines = [x for x in open(os.path.join(golden, "contexts.txt"), encoding="utf-8").read().splitlines() if x]
    contexts = [lines[i % len(lines)] for i in range(args.contexts)]
    reference = None
    if args.reference:
        with open(os.path.join(golden, "encode.jsonl"), encoding="utf-8") as f:
            reference = [json.loads(line)["text"] for _, line in zip(range(args.reference), f)]
    config = SweepConfig(num=args.num, seed=1, max_tokens=args.max_tokens, batch_size=args.batch_size)
    sweep = Sweep(m, enc, contexts, config, reference=reference, model_name=directory)
    chosen = settings([parse_axis(args.grid)], False, sweep.base)
    log(f"warm-up: {chosen[0].label}")
    sweep.measure_setting(dataclasses.replace(chosen[0]))
    rows = []
    states = []
    for s in chosen:
        state = sweep.measure_setting(s)
        states.append((s, state))
        sec = state["seconds"]
        parts = state["metric_seconds"]
        tokens = sum(len(x["ids"]) for c in state["contexts"] for x in c["samples"])
        row = {"setting": s.label, "tokens": tokens, "generate_s": sec["generate"], "metrics_s": sec["metrics"],
               "ratio": sec["metrics"] / sec["generate"], **{f"{k}_s": v for k, v in parts.items()}}
        rows.append(row)
        log(f"  {s.label}: generation {sec['generate']:.2f} s, metrics {sec['metrics']:.2f} s "
            f"({row['ratio']:.1%}): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    t0 = time.perf_counter()
    result_rows = []
    for s, state in states:
        result_rows += sweep.rows(state, s.family)
    if reference is not None:
        with tempfile.TemporaryDirectory() as tmp:
            from pathlib import Path
            result_rows += sweep.rows(sweep.reference_state(Path(tmp)), "reference")
    aggregate = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_report(result_rows, tmp)
        report = time.perf_counter() - t0
    gen = sum(r["generate_s"] for r in rows)
    met = sum(r["metrics_s"] for r in rows)
    summary = {"model": directory, "shape": dict(vars(m.hparams)) if hasattr(m.hparams, "__dict__") else str(m.hparams),
               "contexts": args.contexts, "num": args.num, "max_tokens": args.max_tokens, "settings": rows,
               "generate_s": gen, "metrics_s": met, "ratio": met / gen, "aggregate_s": aggregate, "report_s": report,
               "ratio_with_aggregate_and_report": (met + aggregate + report) / gen,
               "load": os.getloadavg(), "cpu": platform.processor() or platform.machine()}
    cols = ["setting", "tokens", "generate_s", "metrics_s", "ratio", "encode_s", "score_s", "vectors_s", "text_s",
            "mauve_s"]
    print("\t".join(cols))
    for r in rows:
        print("\t".join(f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    print(f"all settings: generation {gen:.2f} s, metrics {met:.2f} s = {met / gen:.1%} of generation "
          f"(target <= 10%); once per sweep: aggregation {aggregate:.2f} s, report {report:.2f} s "
          f"({(met + aggregate + report) / gen:.1%} with them); load average {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
