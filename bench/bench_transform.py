"""Sentence-vector throughput against the compute bound measured in the same run.

    python bench/bench_transform.py [--model DIR] [--lines 1000] [--skip-cold]

* vectors/s for the first N lines of --text (default: the repository's
  synthetic golden texts; ../shared/corpus/ja-man.txt for the reference figures) (what
  ``gpt2-transform.py --input`` does: encode, batch by length, forward pass,
  pool), with the model already loaded;
* the compute bound: the floating-point operations those lines need (the
  transformer blocks and attention, no output projection) divided by the
  rate of a numpy float32 matrix product of the model's sizes, measured here;
  target: at least 0.7 x the bound;
* a cold ``gpt2-transform.py --context`` run for one sentence (target <= 8 s).

The model defaults to /tmp/gpt2ja-small-rand, written by
``bench/make_checkpoint.py small`` when missing.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from texts import add_text_flag, read_texts

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ensure_model(path: str, shape: str = "small") -> str:
    if not os.path.isfile(os.path.join(path, "checkpoint")):
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_checkpoint.py"), shape, path], check=True)
    return path


def matmul_gflops(n_embd: int, rows: int = 2048, repeat: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((rows, n_embd), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n_embd, 4 * n_embd), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * rows * n_embd * 4 * n_embd / best / 1e9


def forward_flops(lengths, n_layer: int, n_embd: int, logits: bool = False, n_vocab: int = 0) -> float:
    """Floating-point operations of the forward pass over sequences of these lengths."""
    total = 0.0
    for t in lengths:
        total += n_layer * (24 * t * n_embd * n_embd + 4 * t * t * n_embd)
        if logits:
            total += 2 * t * n_embd * n_vocab
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/gpt2ja-small-rand")
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-cold", action="store_true")
    add_text_flag(p)
    args = p.parse_args()
    ensure_model(args.model)

    import encoder
    import model
    from tasks.vectors import Vectorizer

    enc = encoder.load()
    m = model.load(args.model)
    hp = m.hparams
    lines = read_texts(args.text, args.lines)
    vec = Vectorizer(m, enc)
    vec.vectors_of_ids([vec.ids(t)[0] for t in lines[:64]])  # warm up (first call traces)

    best = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        ids = [vec.ids(text)[0] for text in lines]
        vec.vectors_of_ids(ids)
        best = min(best, time.perf_counter() - t)
    lengths = [len(i) for i in ids]
    flops = forward_flops(lengths, hp.n_layer, hp.n_embd)
    gflops = matmul_gflops(hp.n_embd)
    achieved = flops / best / 1e9
    bound_vps = len(lines) / (flops / (gflops * 1e9))
    print(f"model: {args.model} ({hp.n_layer} layers, {hp.n_embd} wide)")
    print(f"lines: {len(lines)}, mean {np.mean(lengths):.1f} tokens (max {max(lengths)})")
    print(f"numpy float32 matmul: {gflops:.0f} GFLOP/s  -> bound {bound_vps:.0f} vectors/s")
    print(f"vectors/s: {len(lines) / best:.0f}  ({achieved:.0f} GFLOP/s, {achieved / gflops:.2f} x bound; target 0.7)")

    if not args.skip_cold:
        env = dict(os.environ)
        cold = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "gpt2-transform.py"), "--model", args.model, "--gpu", "-1",
                            "--context", "江戸時代のインターネット回線"], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            cold = min(cold, time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tf_import = time.perf_counter() - t
        print(f"cold single-sentence run: {cold:.1f} s (import tensorflow alone: {tf_import:.1f} s; target <= 8 s)")


if __name__ == "__main__":
    main()
