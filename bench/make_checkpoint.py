#!/usr/bin/env python3
"""Write a random-weight checkpoint of a released gpt2ja shape (for benchmarks).

    python bench/make_checkpoint.py {small,medium,large,tiny} OUT_DIR [--seed S] [--step N]

The weights follow GPT-2's initialisation (see ``model.random_weights``), so
activations stay finite; the layout is the released one (state file,
model-N.index/.data-00000-of-00001, hparams.json).  Weights are generated one
variable at a time as TensorFlow tensors and written in one SaveV2 call, so
about one copy of the weights is in memory (medium 1.4 GB, large 3.1 GB).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.hparams import N_VOCAB_JA, RELEASED, HParams  # noqa: E402  (no TensorFlow yet: --help stays fast)

#: The released shapes, and the tests' tiny one (the shape of tests/data/gpt2ja-tiny).
SHAPES = {**RELEASED, "tiny": HParams(n_vocab=N_VOCAB_JA, n_ctx=1024, n_embd=64, n_head=4, n_layer=2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES), help="released model shape (or tiny, the tests' shape)")
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--step", type=int, default=0, help="checkpoint step N in model-N (default 0)")
    args = parser.parse_args(argv)

    import model
    hp = SHAPES[args.shape]
    t0 = time.time()
    try:
        weights = model.random_weights(hp, seed=args.seed)
        prefix = model.save(weights, args.out_dir, step=args.step, hparams=hp)
    except model.ModelError as e:
        print(f"make_checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"wrote {prefix} ({args.shape}: {hp.n_params:,} parameters, {hp.n_params * 4 / 1e9:.2f} GB) "
          f"in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
