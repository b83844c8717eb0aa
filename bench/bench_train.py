"""Fine-tuning throughput against the compute bound measured in the same run.

    python bench/bench_train.py [--model DIR] [--batch 1] [--chunk 1024] [--steps 5] [--optim adam]

* training tokens/s of ``tasks.train.Trainer.train_step`` (forward, backward,
  Adam update) at batch 1 x 1,024 tokens, with the step already compiled;
* the compute bound: a training step needs about three times the forward
  pass's floating-point operations (forward, plus about twice that for the
  gradients), here counted with the output projection onto the vocabulary
  (training needs the logits); divided by the rate of a numpy float32 matrix
  product of the model's sizes measured here (bench_transform.matmul_gflops);
  target: at least 0.4 x the bound.

The model defaults to /tmp/gpt2ja-small-rand, written by
``bench/make_checkpoint.py small`` when missing.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_transform import ensure_model, forward_flops, matmul_gflops  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/gpt2ja-small-rand")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--optim", default="adam")
    p.add_argument("--accumulate", type=int, default=1)
    args = p.parse_args()
    ensure_model(args.model)

    import model
    from tasks import train as T

    m = model.load(args.model, device=model.select_device("0"))
    hp = m.hparams
    tr = T.Trainer(m, optim=args.optim, learning_rate=1e-5, accumulate=args.accumulate)
    rows = args.batch * args.accumulate
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hp.n_vocab, size=(rows, args.chunk)).astype(np.int32)
    lens = np.full(rows, args.chunk, np.int32)
    t = time.perf_counter()
    tr.train_step(ids, lens)  # compiles
    first = time.perf_counter() - t
    tr.train_step(ids, lens)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        tr.train_step(ids, lens)
        times.append(time.perf_counter() - t)
    best, median = min(times), float(np.median(times))
    tokens = rows * args.chunk
    flops = 3 * forward_flops([args.chunk] * rows, hp.n_layer, hp.n_embd, logits=True, n_vocab=hp.n_vocab)
    gflops = matmul_gflops(hp.n_embd)
    bound_tps = tokens / (flops / (gflops * 1e9))
    achieved = tokens / median
    print(f"model: {args.model} ({hp.n_layer} layers, {hp.n_embd} wide), device {m.device}, optimizer {args.optim}")
    print(f"step: batch {args.batch} x {args.chunk} tokens x accumulate {args.accumulate}; "
          f"first step (compiles) {first:.1f} s; median {median:.2f} s, best {best:.2f} s over {args.steps}")
    print(f"numpy float32 matmul: {gflops:.0f} GFLOP/s  -> bound {bound_tps:.0f} training tokens/s "
          f"(3 x forward = {flops / 1e9:.0f} GFLOP per step)")
    print(f"training tokens/s: {achieved:.0f} median, {tokens / best:.0f} best  "
          f"({flops / median / 1e9:.0f} GFLOP/s, {achieved / bound_tps:.2f} x bound; target 0.4)")


if __name__ == "__main__":
    main()
