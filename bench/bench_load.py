#!/usr/bin/env python3
"""Time ``model.load`` and report peak memory.

    python bench/bench_load.py MODEL_DIR [--forward]

Prints to stdout: TensorFlow import seconds, load seconds, the weights' size,
and the peak RSS of this process (resource.getrusage), with the peak's excess
over the weights.  ``--forward`` also times one [1, 32] logits call.
"""
import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--forward", action="store_true", help="also time one [1, 32] logits call")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    import model
    from model._tf import import_tf
    import_tf()
    t_import = time.perf_counter() - t0
    rss_tf = peak_rss_mb()

    t0 = time.perf_counter()
    try:
        m = model.load(args.model_dir)
    except model.ModelError as e:
        print(f"bench_load: {e}", file=sys.stderr)
        return 2
    t_load = time.perf_counter() - t0
    weights_mb = m.hparams.n_params * 4 / 2**20
    peak = peak_rss_mb()
    print(f"model       {m.path} ({m.hparams.n_layer} layers, {m.hparams.n_embd} wide, "
          f"{m.hparams.n_params:,} parameters)")
    print(f"import_tf_s {t_import:.2f}")
    print(f"load_s      {t_load:.2f}")
    print(f"weights_mb  {weights_mb:.0f}")
    print(f"rss_after_import_tf_mb {rss_tf:.0f}")
    print(f"peak_rss_mb {peak:.0f}  (weights + {peak - weights_mb:.0f} MB; "
          f"after TF import + {peak - rss_tf - weights_mb:.0f} MB beyond the weights)")
    if args.forward:
        import numpy as np
        ids = np.random.default_rng(0).integers(0, m.hparams.n_vocab, (1, 32))
        t0 = time.perf_counter()
        m.logits(ids)
        print(f"first_logits_1x32_s {time.perf_counter() - t0:.2f}")
        print(f"peak_rss_after_forward_mb {peak_rss_mb():.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
