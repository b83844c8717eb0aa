#!/usr/bin/env python3
"""gpt2-sweep.py: what its own metrics cost next to its generation (target: at most 10%).

    python bench/bench_sweep.py [--shape small] [--model DIR] [--contexts 8] [--num 4] [--max_tokens 64]
                                [--grid top_k=1,20,40] [--batch_size 16] [--reference 64]
                                [--relation_samples 1|N|all] [--json FILE]

A sweep (``tasks.sweep.run.Sweep``) over --grid on the repository's contexts
(tests/data/golden/contexts.txt, cycled to --contexts), with the first --reference texts of the encoder
goldens as the reference (so MAUVE is computed), on a random-weight checkpoint of --shape
(bench/make_checkpoint.py, made under /tmp when missing) or on --model.  A first, untimed setting warms
the compiled functions up (generation, the forward passes, the context and reference vectors).  For
every timed setting: seconds of generation (which also reads each drawn token's log-probability off the
logits: ``generate_many(..., details=True)``) and of each part of the metrics (``encode``: the samples'
tokens -- taken from generation, re-encoded only where a text was cut --; ``forward``: one plan of
batched forward passes that scores every sample given <|endoftext|> (and, with --judge or where
generation's numbers do not apply, given its context) and computes its sentence vector; ``text``: the
text metrics; ``mauve``), and the ratio metrics / generation (target: at most 10%).  Reading the
log-probabilities is metric work done inside generation, so it is also measured on its own
(``details``: the scheduler's per-token log-softmax timed on one row of logits, times the tokens drawn)
and a second ratio counts it on the metrics' side: (metrics + details) / (generation - details).  The
first setting is also generated once without details (a direct but noisier view of the same cost).
Then the seconds of the aggregation (bootstrap intervals: each setting's rows, computed once when it is
finished, so counted per setting), of the reference's own statistics and of the report (plots,
report.html), the last two paid once per sweep.  Prints a table on stdout with the CPU (``lscpu`` model
name and its AVX/AMX flags) and the load average before and after; --json FILE writes the figures.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
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


def cpu() -> str:
    """``lscpu``'s model name and the vector/matrix ISA flags (AVX2, AVX-512, AMX, ...)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "?").strip()
    flags = [f for f in fields.get("Flags", "").split() if f.startswith(("avx", "amx", "fma"))]
    return f"{name}; {os.cpu_count()} CPUs; {' '.join(flags) or 'no AVX flags'}"


def details_per_token(n_vocab: int, repeat: int = 500) -> float:
    """Seconds the scheduler spends on one drawn token's log-probability (``SampleRequest.logprobs=0``)."""
    import numpy as np

    from tasks.scheduler import _logprobs

    row = np.random.default_rng(0).normal(size=n_vocab).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(repeat):
        _logprobs(row, 5, 0)
    return (time.perf_counter() - t0) / repeat


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
    p.add_argument("--relation_samples", default="1", help="as gpt2-sweep.py's (a count or 'all'; default 1)")
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
    relation = None if args.relation_samples == "all" else int(args.relation_samples)
    config = SweepConfig(num=args.num, seed=1, max_tokens=args.max_tokens, batch_size=args.batch_size,
                         relation_samples=relation)
    sweep = Sweep(m, enc, contexts, config, reference=reference, model_name=directory)
    chosen = settings([parse_axis(args.grid)], False, sweep.base)
    load_before = os.getloadavg()
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
    sweep.generate(chosen[0].options)  # without details
    plain = time.perf_counter() - t0
    log(f"  {chosen[0].label} without details: generation {plain:.2f} s")
    t0 = time.perf_counter()
    result_rows = []
    for s, state in states:
        result_rows += sweep.rows(state, s.family)
    aggregate = time.perf_counter() - t0
    for row, (s, state) in zip(rows, states):  # (each setting's rows are computed once, when it is finished)
        row["aggregate_s"] = aggregate / len(states)
    t0 = time.perf_counter()
    if reference is not None:
        with tempfile.TemporaryDirectory() as tmp:
            from pathlib import Path
            result_rows += sweep.rows(sweep.reference_state(Path(tmp)), "reference")
    reference_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_report(result_rows, tmp)
        report = time.perf_counter() - t0
    gen = sum(r["generate_s"] for r in rows)
    met = sum(r["metrics_s"] for r in rows)
    per_token = details_per_token(m.hparams.n_vocab)
    details = per_token * sum(r["tokens"] for r in rows)
    summary = {"model": directory, "relation_samples": args.relation_samples, "shape": dict(vars(m.hparams)) if hasattr(m.hparams, "__dict__") else str(m.hparams),
               "contexts": args.contexts, "num": args.num, "max_tokens": args.max_tokens, "settings": rows,
               "generate_s": gen, "metrics_s": met, "ratio": met / gen, "aggregate_s": aggregate, "report_s": report,
               "details_per_token_s": per_token, "details_s": details,
               "ratio_counting_details": (met + details) / (gen - details),
               "reference_s": reference_s, "ratio_with_aggregate": (met + aggregate) / gen,
               "ratio_with_aggregate_and_report": (met + aggregate + reference_s + report) / gen,
               "generate_without_details_s": {chosen[0].label: plain},
               "load_before": load_before, "load_after": os.getloadavg(), "cpu": cpu()}
    cols = ["setting", "tokens", "generate_s", "metrics_s", "ratio", "encode_s", "forward_s", "text_s", "mauve_s"]
    print("\t".join(cols))
    for r in rows:
        print("\t".join(f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    first = rows[0]
    print(f"reading the drawn tokens' log-probabilities (inside generation): {per_token * 1e6:.0f} us a token, "
          f"{details:.2f} s in all; counted as metrics: ({met:.2f} + {details:.2f}) / ({gen:.2f} - {details:.2f}) "
          f"= {summary['ratio_counting_details']:.1%}")
    print(f"all settings: generation {gen:.2f} s, metrics {met:.2f} s = {met / gen:.1%} of generation "
          f"(target <= 10%); with each setting's rows (bootstrap intervals, {aggregate:.2f} s) "
          f"{(met + aggregate) / gen:.1%}; once per sweep: the reference's own statistics {reference_s:.2f} s, "
          f"report {report:.2f} s ({(met + aggregate + reference_s + report) / gen:.1%} with everything)")
    print(f"{first['setting']} generated without details: {plain:.2f} s (with: {first['generate_s']:.2f} s)")
    print(f"relation samples (PMI, cosine, MAUVE) per context: {args.relation_samples} of {args.num}")
    print(f"cpu: {summary['cpu']}")
    print("load average (1, 5, 15 min): before " + " ".join(f"{x:.2f}" for x in load_before)
          + ", after " + " ".join(f"{x:.2f}" for x in summary["load_after"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
