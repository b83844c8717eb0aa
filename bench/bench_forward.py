#!/usr/bin/env python3
"""Speed of the batched forward pass and of cached decoding, against bounds measured in the same run.

    python bench/bench_forward.py MODEL_DIR [--steps 64] [--prompt 32] [--max-len 256]

Prints to stdout:
- ``Model.logits`` on [1, 32] and [32, 32] batches (seconds, GFLOP/s and the
  ratio to a numpy float32 GEMM of the same size measured here);
- decoding: ms per ``Model.step`` at batch 1 and tokens/s, and the ratio to
  the memory-bandwidth bound measured here (a numpy matrix-vector chain over
  the same weights: the time one step cannot go below).
These machines are shared and noisy: each figure is the best of a few repeats.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best_of(fn, repeats=3, inner=1):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def bandwidth_bound(m) -> float:
    """Seconds for x @ W over every weight matrix (and x @ wte^T) in numpy, batch 1."""
    mats = [v.numpy() for k, v in m.variables.items() if k.endswith("/w")]
    wte = m.variables["model/wte"].numpy()
    xs = {w.shape[0]: np.ones((1, w.shape[0]), np.float32) for w in mats}

    def chain():
        for w in mats:
            xs[w.shape[0]] @ w
        xs[wte.shape[1]] @ wte.T

    chain()
    return best_of(chain, repeats=5)


def gemm_gflops(n_tokens: int, n_embd: int) -> float:
    a = np.ones((n_tokens, n_embd), np.float32)
    b = np.ones((n_embd, 4 * n_embd), np.float32)
    a @ b
    t = best_of(lambda: a @ b, repeats=5)
    return 2 * n_tokens * n_embd * 4 * n_embd / t / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--steps", type=int, default=64, help="decoding steps to time (default 64)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length before decoding (default 32)")
    parser.add_argument("--max-len", type=int, default=256, help="cache size (default 256)")
    args = parser.parse_args(argv)

    import model
    m = model.load(args.model_dir)
    hp = m.hparams
    rng = np.random.default_rng(0)
    print(f"model {m.path}: {hp.n_layer} layers, {hp.n_embd} wide, {hp.n_params:,} parameters")

    flops_per_token = 2 * (hp.n_params - hp.n_ctx * hp.n_embd)  # every matrix once, wte as the output projection
    for batch, length in ((1, 32), (32, 32)):
        ids = rng.integers(0, hp.n_vocab, (batch, length))
        m.logits(ids)  # trace
        t = best_of(lambda: m.logits(ids), repeats=3)
        gflops = flops_per_token * batch * length / t / 1e9
        ref = gemm_gflops(batch * length, hp.n_embd)
        print(f"logits [{batch}, {length}]: {t:.3f} s, {gflops:.0f} GFLOP/s = {gflops / ref:.2f} of numpy GEMM "
              f"({ref:.0f} GFLOP/s)")

    ids = rng.integers(0, hp.n_vocab, (1, args.prompt))
    t0 = time.perf_counter()
    cache, last = m.start(ids, max_len=args.max_len)
    print(f"prefill [1, {args.prompt}] (first call, includes tracing): {time.perf_counter() - t0:.2f} s")
    steps = min(args.steps, cache.room - 3)
    for _ in range(3):
        m.step(cache, [1])
    per_step = []
    for _ in range(steps):
        t0 = time.perf_counter()
        last = m.step(cache, [int(last[0].argmax())])
        per_step.append(time.perf_counter() - t0)
    step = float(np.median(per_step))
    bound = bandwidth_bound(m)
    print(f"decode batch 1: {step * 1000:.1f} ms/step median, {min(per_step) * 1000:.1f} best, "
          f"{1 / step:.1f} tokens/s; bandwidth bound {bound * 1000:.1f} ms ({1 / bound:.1f} tokens/s): "
          f"{bound / step:.2f} of the bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
