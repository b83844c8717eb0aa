#!/usr/bin/env python3
"""Speed of scoring sentences (gpt2-score.py's library) against a GEMM bound measured in the same run.

    python bench/bench_score.py [MODEL_DIR] [--lines 1000] [--batch-tokens 2048] [--precision fp32 bf16]

MODEL_DIR defaults to /tmp/gpt2ja-small-rand (make it with
``python bench/make_checkpoint.py small /tmp/gpt2ja-small-rand``); the
vocabulary is the one in encoder/.  Scores the first
--lines lines of --text (default: the repository's synthetic golden texts;
../shared/corpus/ja-man.txt for the reference figures) (as gpt2-score.py does: stripped,
<|endoftext|> before and after each line) and prints:

- lines/s and tokens/s of ``Scorer.score`` on chunks of lines as gpt2-score.py
  reads them (encoding included, tracing and model loading excluded);
- the compute bound: the floating-point operations the forward pass needs for
  those lines (per token 2 * 12 * n_layer * n_embd^2 for the weight matrices,
  causal attention 2 * 2 * t * n_embd per layer for a token with t tokens up to
  it, and the output projection 2 * n_embd * n_vocab per scored token) divided
  by the rate of a numpy float32 product [512, n_embd] x [n_embd, 4 * n_embd]
  measured here (averaged over 3 s just before and just after each run), and
  the ratio of the measured rate to that bound.

These machines are shared and noisy: each of the --repeats runs is printed
with its own bound, measured next to it.  ``--precision fp32 bf16`` scores with
both in the same run, interleaved (each repeat runs every precision in turn,
between the same two bound measurements), and prints how far the bf16 scores
are from the fp32 ones (per line and per token) and the load average.
"""
import argparse
import os
import sys
import time

import numpy as np
from texts import add_text_flag, read_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def gemm_gflops(rows: int, n_embd: int, seconds: float = 3.0) -> float:
    """Average GFLOP/s of a numpy float32 [rows, n_embd] x [n_embd, 4 * n_embd] product over
    ``seconds`` (an average, like the scoring time it is compared with, so that both see
    the same share of a shared machine)."""
    a = np.random.default_rng(0).standard_normal((rows, n_embd)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n_embd, 4 * n_embd)).astype(np.float32)
    a @ b
    n = 0
    t0 = time.perf_counter()
    while True:
        a @ b
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * rows * n_embd * 4 * n_embd * n / elapsed / 1e9


def forward_flops(hp, lengths, scored) -> float:
    """FLOPs a forward pass needs over rows of these lengths, with ``scored`` output projections."""
    lengths = np.asarray(lengths, np.float64)
    tokens = lengths.sum()
    weights = 2 * 12 * hp.n_layer * hp.n_embd ** 2 * tokens
    attention = 2 * 2 * hp.n_embd * hp.n_layer * (lengths * (lengths + 1) / 2).sum()
    output = 2 * hp.n_embd * hp.n_vocab * scored
    return weights + attention + output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", default="/tmp/gpt2ja-small-rand")
    parser.add_argument("--lines", type=int, default=1000, help="corpus lines to score (default 1000)")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per batch (default 2048)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs, each printed with its own bound (default 2)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                        help="one or more precisions, scored in interleaved rounds (default fp32)")
    add_text_flag(parser)
    args = parser.parse_args(argv)

    import encoder
    import model
    from cli.score import CHUNK_LINES
    from tasks.score import Scorer

    enc = encoder.load()
    m = model.load(args.model_dir)
    hp = m.hparams
    texts = [t.strip() for t in read_texts(args.text, args.lines)]
    texts = [t for t in texts if t]
    print(f"model {m.path}: {hp.n_layer} layers, {hp.n_embd} wide, {hp.n_params:,} parameters")

    precisions = list(dict.fromkeys(args.precision))
    scorers = {p: Scorer(m, enc, max_tokens=args.batch_tokens, precision=p) for p in precisions}
    for p, scorer in scorers.items():
        t0 = time.perf_counter()
        list(scorer.score(texts[:4]))  # traces the compiled function
        print(f"{p} first call (tracing): {time.perf_counter() - t0:.2f} s")
    print(f"load average before: {load_average()}")
    runs = []  # (precision, seconds, GEMM GFLOP/s measured just before and after the round)
    results = {}
    for _ in range(args.repeats):
        before = gemm_gflops(512, hp.n_embd)
        timed = []
        for p, scorer in scorers.items():  # interleaved: each precision sees the same share of the machine
            t0 = time.perf_counter()
            results[p] = []
            for i in range(0, len(texts), CHUNK_LINES):  # as gpt2-score.py reads its input
                results[p].extend(scorer.score(texts[i:i + CHUNK_LINES]))
            timed.append((p, time.perf_counter() - t0))
        gflops = (before + gemm_gflops(512, hp.n_embd)) / 2
        runs += [(p, seconds, gflops) for p, seconds in timed]
    load_after = load_average()
    first = results[precisions[0]]
    scored = sum(len(r.ids) for r in first)
    lengths = [len(r.ids) + 1 for r in first]  # <|endoftext|> first
    flops = forward_flops(hp, lengths, scored)
    print(f"{len(texts)} lines, {sum(lengths):,} tokens ({scored:,} scored), {flops / 1e12:.2f} TFLOP, "
          f"batches of {args.batch_tokens} padded tokens")
    for p, seconds, gflops in runs:
        bound = flops / (gflops * 1e9)
        print(f"{p} scoring: {seconds:.2f} s = {len(texts) / seconds:.1f} lines/s, {sum(lengths) / seconds:.0f} tokens/s, "
              f"{flops / seconds / 1e9:.0f} GFLOP/s; bound: numpy GEMM [512, {hp.n_embd}] x [{hp.n_embd}, "
              f"{4 * hp.n_embd}] at {gflops:.0f} GFLOP/s -> {bound:.2f} s = {len(texts) / bound:.1f} lines/s; "
              f"measured / bound = {bound / seconds:.2f}")
    for p in precisions[1:]:
        base = [s for q, s, _ in runs if q == precisions[0]]
        mine = [s for q, s, _ in runs if q == p]
        line = np.array([a.logprob - b.logprob for a, b in zip(results[p], first)])
        rel = np.abs(line) / np.maximum(np.abs([b.logprob for b in first]), 1e-30)
        tok = np.concatenate([a.logprobs - b.logprobs for a, b in zip(results[p], first)])
        print(f"{p} / {precisions[0]}: {min(base) / min(mine):.2f} x the lines/s (best), rounds "
              f"{', '.join(f'{a / b:.2f}' for a, b in zip(base, mine))}")
        print(f"{p} - {precisions[0]} scores: per line |diff| max {np.abs(line).max():.4f} mean {np.abs(line).mean():.4f} "
              f"nat, relative max {rel.max():.2e} mean {rel.mean():.2e}; per token |diff| max {np.abs(tok).max():.4f} "
              f"rms {np.sqrt(np.mean(tok ** 2)):.4f} nat")
    print(f"load average after: {load_after}")
    return 0


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (the machines are shared)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
