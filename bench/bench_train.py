"""Fine-tuning throughput, memory and time to the first step, against the compute bound measured in the same run.

    python bench/bench_train.py [--model DIR] [--batch 1] [--chunk 1024] [--steps 5] [--optim adam]
                                [--configs full-fp32,full-bf16,lora-fp32,lora-bf16] [--rank 8]

For each configuration, in its own process (so that its peak RSS is its own):

* time to the first step after the model is loaded: making the Trainer (optimizer slots),
  tracing the step (``Trainer.trace``) and the first step itself (graph optimisation, oneDNN
  primitives, first touch of the buffers), each timed;
* training tokens/s of ``tasks.train.Trainer.train_step`` (forward, backward, Adam update)
  at batch x chunk tokens, median over ``--steps`` steps after the first two;
* peak RSS of the process (ru_maxrss).

Configurations: full-fp32 (every weight trains, float32: the default), full-bf16 (bfloat16
products, float32 weights and Adam state), lora-fp32 / lora-bf16 (a rank ``--rank`` adapter on
the four block matrices of every block; with bf16 the frozen base matrices are held in bfloat16).

The bound: a training step needs about three times the forward pass's floating-point operations
(forward, plus about twice that for the gradients), here counted with the output projection onto
the vocabulary; divided by the rate of a numpy float32 matrix product of the model's sizes
measured here (bench_transform.matmul_gflops).  A LoRA step skips the weight gradients of the
frozen matrices (about a third of the work), so its ratio to this bound may exceed a full step's.
The model defaults to /tmp/gpt2ja-small-rand, written by ``bench/make_checkpoint.py small`` when missing.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_transform import ensure_model, forward_flops, matmul_gflops  # noqa: E402

CONFIGS = ("full-fp32", "full-bf16", "lora-fp32", "lora-bf16")


def one(args) -> dict:
    """Run one configuration in this process; a dict of its figures."""
    import model
    from model import lora
    from tasks import train as T

    kind, precision = args.one.split("-")
    t = time.perf_counter()
    m = model.load(args.model, device=model.select_device("0"),
                   precision=precision if kind == "lora" else "fp32")
    loaded = time.perf_counter() - t
    hp = m.hparams
    t0 = time.perf_counter()
    adapter = lora.attach(m, rank=args.rank) if kind == "lora" else None
    tr = T.Trainer(m, optim=args.optim, learning_rate=1e-5, accumulate=args.accumulate, adapter=adapter,
                   precision=precision)
    made = time.perf_counter() - t0
    t = time.perf_counter()
    tr.trace()
    traced = time.perf_counter() - t
    rows = args.batch * args.accumulate
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hp.n_vocab, size=(rows, args.chunk)).astype(np.int32)
    lens = np.full(rows, args.chunk, np.int32)
    t = time.perf_counter()
    tr.train_step(ids, lens)
    first = time.perf_counter() - t
    to_first = time.perf_counter() - t0
    tr.train_step(ids, lens)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        tr.train_step(ids, lens)
        times.append(time.perf_counter() - t)
    return {"config": args.one, "load_s": loaded, "trainer_s": made, "trace_s": traced, "first_step_s": first,
            "to_first_step_s": to_first, "median_s": float(np.median(times)), "best_s": min(times),
            "tokens": rows * args.chunk, "trained_params": adapter.n_params if adapter else hp.n_params,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "device": m.device, "bf16_native": bool(model.bf16_native(m.device))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/gpt2ja-small-rand")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--optim", default="adam")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    ensure_model(args.model)
    from model.checkpoint import open_checkpoint
    hp = open_checkpoint(args.model)[1]
    rows = args.batch * args.accumulate
    flops = 3 * forward_flops([args.chunk] * rows, hp.n_layer, hp.n_embd, logits=True, n_vocab=hp.n_vocab)
    gflops = matmul_gflops(hp.n_embd)
    bound_tps = rows * args.chunk / (flops / (gflops * 1e9))
    print(f"model: {args.model} ({hp.n_layer} layers, {hp.n_embd} wide), optimizer {args.optim}; step: batch "
          f"{args.batch} x {args.chunk} tokens x accumulate {args.accumulate}; median over {args.steps} steps")
    print(f"numpy float32 matmul: {gflops:.0f} GFLOP/s -> bound {bound_tps:.0f} training tokens/s "
          f"(3 x forward = {flops / 1e9:.0f} GFLOP per step)")
    results = {}
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", config, "--model", args.model, "--batch", str(args.batch),
               "--chunk", str(args.chunk), "--steps", str(args.steps), "--optim", args.optim,
               "--accumulate", str(args.accumulate), "--rank", str(args.rank)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"{config}: failed\n{r.stderr[-2000:]}")
            continue
        res = results[config] = json.loads(r.stdout.strip().splitlines()[-1])
        tps = res["tokens"] / res["median_s"]
        print(f"{config:9s}: {tps:6.0f} tokens/s ({tps / bound_tps:.2f} x bound), "
              f"peak RSS {res['peak_rss_gib']:.2f} GiB, "
              f"{res['trained_params']:,} trained parameters; first step {res['to_first_step_s']:.1f} s after loading "
              f"(trainer {res['trainer_s']:.1f} + trace {res['trace_s']:.1f} + step {res['first_step_s']:.1f}; a later "
              f"step {res['median_s']:.1f}){'' if res['bf16_native'] or 'bf16' not in config else ' [bf16 emulated]'}")
    base = results.get("full-fp32")
    if base:
        for config, res in results.items():
            if config != "full-fp32":
                print(f"{config} / full-fp32: tokens/s x{base['median_s'] / res['median_s']:.2f}, "
                      f"peak RSS x{res['peak_rss_gib'] / base['peak_rss_gib']:.2f}")


if __name__ == "__main__":
    main()
