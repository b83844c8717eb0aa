"""Sentence-vector throughput against the compute bound measured in the same run.

    python bench/bench_transform.py [--model DIR] [--lines 1000] [--skip-cold] [--precision fp32 bf16]

* vectors/s for the first N lines of --text (default: the repository's
  synthetic golden texts; ../shared/corpus/ja-man.txt for the reference figures) (what
  ``gpt2-transform.py --input`` does: encode, batch by length, forward pass,
  pool), with the model already loaded;
* the compute bound: the floating-point operations those lines need (the
  transformer blocks and attention, no output projection) divided by the
  rate of a numpy float32 matrix product of the model's sizes, measured here;
  target: at least 0.7 x the bound;
* a cold ``gpt2-transform.py --context`` run for one sentence (target <= 8 s).

``--precision fp32 bf16`` measures both in the same run, their rounds
interleaved (fp32, bf16, fp32, bf16, ...; best and median of --repeat each),
and prints the cosine similarity of the bf16 vectors to the fp32 ones
(min/mean over the lines) and the machine's load average.

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


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (the machines are shared)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/gpt2ja-small-rand")
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-cold", action="store_true")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                   help="one or more precisions, measured in interleaved rounds (default fp32)")
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
    precisions = list(dict.fromkeys(args.precision))
    vecs = {p: Vectorizer(m, enc, precision=p) for p in precisions}
    for vec in vecs.values():
        vec.vectors_of_ids([vec.ids(t)[0] for t in lines[:64]])  # warm up (first call traces)

    print(f"load average before: {load_average()}")
    times = {p: [] for p in precisions}
    vectors = {}
    for _ in range(args.repeat):
        for p, vec in vecs.items():  # interleaved: each precision sees the same share of a shared machine
            t = time.perf_counter()
            ids = [vec.ids(text)[0] for text in lines]
            vectors[p] = vec.vectors_of_ids(ids)
            times[p].append(time.perf_counter() - t)
    load_after = load_average()
    lengths = [len(i) for i in ids]
    flops = forward_flops(lengths, hp.n_layer, hp.n_embd)
    gflops = matmul_gflops(hp.n_embd)
    bound_vps = len(lines) / (flops / (gflops * 1e9))
    print(f"model: {args.model} ({hp.n_layer} layers, {hp.n_embd} wide)")
    print(f"lines: {len(lines)}, mean {np.mean(lengths):.1f} tokens (max {max(lengths)})")
    print(f"numpy float32 matmul: {gflops:.0f} GFLOP/s  -> bound {bound_vps:.0f} vectors/s")
    for p in precisions:
        best = min(times[p])
        achieved = flops / best / 1e9
        print(f"{p} vectors/s: {len(lines) / best:.0f} best, {len(lines) / np.median(times[p]):.0f} median of "
              f"{len(times[p])}  ({achieved:.0f} GFLOP/s, {achieved / gflops:.2f} x float32 bound; target 0.7)")
    for p in precisions[1:]:
        ratio = min(times[precisions[0]]) / min(times[p])
        pairs = [a / b for a, b in zip(times[precisions[0]], times[p])]
        a, b = vectors[precisions[0]].astype(np.float64), vectors[p].astype(np.float64)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"{p} / {precisions[0]}: {ratio:.2f} x the vectors/s (best), rounds {', '.join(f'{r:.2f}' for r in pairs)}; "
              f"cosine to {precisions[0]}: min {cos.min():.6f}, mean {cos.mean():.6f}")
    print(f"load average after: {load_after}")

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
