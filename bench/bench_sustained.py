#!/usr/bin/env python3
"""Sustained decoding as the user gets it, next to the decoder's short bursts, and where the gap goes.

    python bench/bench_sustained.py [MODEL_DIR] [--tokens 256] [--rounds 3] [--formats fp32,q8,q4]

For each weight format (fp32 = float32 ONNX Runtime, what ``--engine auto`` uses) and 1 and 8
rows, medians of interleaved rounds:

- burst: decoder steps from position 8, 16 in a row (how bench_quantize / bench_engines measure);
- engine over the run: the same decoder stepping every position of a ``--tokens`` run from
  position 8 (attention over longer rows; the cache written further in);
- CLI: ``gpt2-generate.py --verbose``'s own decoding rate for ``--tokens`` tokens (top_k 40, the
  default sampling; ``--num_generate`` 1 or 8), a separate process as a user runs it.

CLI / burst is the figure issue 26 asks to be >= 0.9; engine-over-the-run / burst is the part the
decoder itself loses, CLI / engine-over-the-run the part the loop around it (the sampler chain,
text assembly, bookkeeping) costs.  The CPU's model name and ISA flags are printed with the figures.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import numpy as np  # noqa: E402

from bench_engines import machine  # noqa: E402


def _steps(dec, rows: int, start: int, count: int, rng) -> float:
    """tokens/s of ``count`` steps of ``rows`` rows whose prompts hold ``start`` tokens."""
    hp = dec.hparams
    ids = list(range(rows))
    dec.add(ids, [list(rng.integers(0, hp.n_vocab, start)) for _ in ids])
    t0 = time.perf_counter()
    for _ in range(count):
        dec.step(ids, list(rng.integers(0, hp.n_vocab, rows)))
    dt = time.perf_counter() - t0
    dec.remove(ids)
    return rows * count / dt


def _cli(model_dir: str, fmt: str, rows: int, tokens: int) -> float:
    cmd = [sys.executable, os.path.join(ROOT, "gpt2-generate.py"), "--model", model_dir, "--gpu", "-1",
           "--num_generate", str(rows), "--batch_size", str(rows), "--max_tokens", str(tokens),
           "--context", "今日は良い天気です。", "--seed", "1", "--verbose"]
    if fmt != "fp32":
        cmd += ["--quantize", fmt]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    m = re.search(r"decoding: (\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\)", p.stderr)
    if p.returncode != 0 or not m:
        raise SystemExit(f"bench_sustained: {' '.join(cmd)}:\n{p.stderr}")
    return float(m.group(2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?", default=os.path.join(ROOT, "bench", "out", "small"))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", default="fp32,q8,q4")
    args = ap.parse_args(argv)
    import model

    info = machine()
    print(f"CPU: {info.get('cpu', '?')}; {' '.join(info.get('isa', []))}; load {info['load'][0]:.1f}")
    m = model.load_for_decoding(args.model_dir)
    formats = args.formats.split(",")
    decs = {f: model.decoder(m, engine="onnx", quantize=None if f == "fp32" else f) for f in formats}
    for f in formats:  # the CLI's quantized weights and kept graphs exist before timing
        _cli(args.model_dir, f, 1, 2)
    rng = np.random.default_rng(0)
    res = {(f, r, k): [] for f in formats for r in (1, 8) for k in ("burst", "run", "cli")}
    for _ in range(args.rounds):
        for f in formats:
            for rows in (1, 8):
                res[f, rows, "burst"].append(max(_steps(decs[f], rows, 8, 16, rng) for _ in range(3)))
                res[f, rows, "run"].append(_steps(decs[f], rows, 8, args.tokens, rng))
                res[f, rows, "cli"].append(_cli(args.model_dir, f, rows, args.tokens))
    print(f"tokens/s, medians of {args.rounds} rounds; {args.tokens} tokens from position 8")
    print("format rows   burst  engine-run   CLI   CLI/burst  run/burst  CLI/run")
    for f in formats:
        for rows in (1, 8):
            b, r, c = (statistics.median(res[f, rows, k]) for k in ("burst", "run", "cli"))
            print(f"{f:6} {rows:4} {b:7.1f} {r:11.1f} {c:6.1f} {c / b:10.2f} {r / b:10.2f} {c / r:8.2f}")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
