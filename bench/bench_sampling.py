#!/usr/bin/env python3
"""Cost of the sampler chain with every control enabled, against a batch-1 decoding step.

    python bench/bench_sampling.py [--dir DIR] [--shape small] [--position 300] [--generated 200]
                                   [--steps 32] [--repeats 5] [--json FILE]

- step: ``NumpyDecoder.step`` at batch 1 from --position (``bench_generate.decode_measure``), on a
  random-weight checkpoint of --shape (bench/make_checkpoint.py; created under /tmp when missing);
- chain: ``tasks.sampling.sample`` over one row of that model's logits, its history --position
  context tokens and --generated drawn tokens, (a) with the default settings (the original's chain),
  (b) with every control on (penalties over the whole history, no_repeat_ngram_size 3, DRY, top_k
  with top_p, typical_p, min_p, XTC at probability 1, logit_bias, ban, temperature 0.8), on a
  history of random tokens and on a repetitive one (a 20-token phrase looping through the
  generated part: DRY's worst usual case); (c) as (b) without top_k (typical_p, top_p, min_p and
  XTC then work over the whole vocabulary);
- ratio: chain (b) / step, target <= 0.10.  Best of --repeats.

The one-off cost of finding DRY's sequence-breaker tokens (once per encoder) is reported apart.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def chain_measure(logits, history, steps_drawn, params, enc, calls: int):
    """A function timing ``calls`` runs of the chain (the Rows copy included, as the scheduler makes it)."""
    from tasks.sampling import Rows, sample

    rngs = [np.random.default_rng(0)]

    def run():
        for _ in range(calls):
            sample(Rows(logits[None], [history], [steps_drawn], rngs, enc.eos_id, enc=enc), params)

    return run


def everything():
    from tasks.sampling import SamplingParams

    return SamplingParams(top_k=40, top_p=0.95, temperature=0.8, repetition_penalty=1.2, presence_penalty=0.5,
                          frequency_penalty=0.5, no_repeat_ngram_size=3, min_p=0.05, typical_p=0.95,
                          dry_multiplier=0.8, xtc_probability=1.0, xtc_threshold=0.1,
                          logit_bias={10: 2.0, 20: -2.0, 30: 1.0}, ban=(40, 50))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small")
    parser.add_argument("--dir", default=None, help="checkpoint directory (default /tmp/gpt2ja-SHAPE-rand)")
    parser.add_argument("--position", type=int, default=300, help="context tokens (default 300)")
    parser.add_argument("--generated", type=int, default=200, help="tokens drawn so far (default 200)")
    parser.add_argument("--steps", type=int, default=32, help="steps / chain runs timed per repeat (default 32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", default=None)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    import bench_generate
    import encoder
    import model
    from model.npdecode import NumpyDecoder, cpu_weights
    from tasks.sampling import SamplingParams, breaker_ids

    directory = args.dir or f"/tmp/gpt2ja-{args.shape}-rand"
    bench_generate.ensure_checkpoint(args.shape, directory)
    enc = encoder.load(args.vocab)
    m = model.load(directory)
    hp = m.hparams
    dec = NumpyDecoder(hp, cpu_weights(m))
    step = best_of(bench_generate.decode_measure(dec, hp, 1, args.position, args.steps), args.repeats) / args.steps

    rng = np.random.default_rng(1)
    dec.clear()
    logits = dec.add([0], [rng.integers(0, hp.n_vocab, args.position)])[0]
    t0 = time.perf_counter()
    breaker_ids(enc, SamplingParams().dry_sequence_breakers)
    breakers_once = time.perf_counter() - t0

    context = list(rng.integers(0, hp.n_vocab, args.position))
    histories = {"random": context + list(rng.integers(0, hp.n_vocab, args.generated)),
                 "repetitive": context + [int(t) for t in np.resize(rng.integers(0, hp.n_vocab, 20), args.generated)]}
    results = {"shape": args.shape, "position": args.position, "generated": args.generated,
               "step_ms": step * 1e3, "breaker_ids_once_ms": breakers_once * 1e3, "chain": {}}
    print(f"{args.shape}: batch-1 decoder step from position {args.position}: {step * 1e3:.2f} ms; "
          f"DRY breaker ids (once per encoder): {breakers_once * 1e3:.0f} ms")
    for name, history in histories.items():
        for label, params in (("default", SamplingParams()), ("every control", everything()),
                              ("all, no top_k", replace(everything(), top_k=0))):
            t = best_of(chain_measure(logits, history, args.generated, params, enc, args.steps),
                        args.repeats) / args.steps
            results["chain"][f"{name}/{label}"] = {"ms": t * 1e3, "of_step": t / step}
            print(f"  chain, {label:14s} {name:10s} history of {len(history)}: {t * 1e3:6.3f} ms = "
                  f"{100 * t / step:5.1f}% of a step")
    worst = max(v["of_step"] for k, v in results["chain"].items() if k.endswith("every control"))
    results["worst_every_control_of_step"] = worst
    print(f"every control on: at most {100 * worst:.1f}% of a batch-1 step (target <= 10%)")
    load = os.getloadavg()
    results["loadavg"] = load
    print(f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
