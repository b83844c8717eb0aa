#!/usr/bin/env python3
"""Speed of text generation on the CPU, against a memory-bandwidth bound measured in the same run.

    python bench/bench_generate.py [--shapes small,medium] [--dir-small DIR] [--dir-medium DIR]
                                   [--steps 64] [--skip-cold] [--batch-shapes small] [--json FILE]

For each shape (random-weight checkpoints from bench/make_checkpoint.py;
created under /tmp when missing):

- bound: a numpy float32 matrix-vector chain over the same weight bytes as
  one decoding step (per layer x[1,E] @ c_attn/w, @ c_proj/w, @ c_fc/w,
  x[1,4E] @ mlp/c_proj/w; then x @ wte.T), on the model's own weight arrays
  (``npdecode.cpu_weights``).  Its steps/s is the "bound tokens/s"; weight
  bytes / time is the implied memory bandwidth (GB/s).
- decode b1: tokens/s of ``NumpyDecoder.step`` at batch 1 over --steps steps
  after an 8-token prefill (positions 8..), and again from position 300 (so
  the attention over the cache shows); ratio to the bound (target >= 0.8).
- generate b1: tokens/s of the full ``Generator.generate`` loop (top_k 40
  sampling, text assembly included; prefill excluded) at batch 1, ratio to
  the bound (target >= 0.8).
- batch 8 (shapes in --batch-shapes, default small): aggregate tokens/s of
  ``NumpyDecoder.step`` at batch 8, of the Generator loop with num=8 on the
  engine ``--engine auto`` picks for 8 rows (float32 ONNX Runtime; target:
  llama.cpp f32's aggregate, 277 tokens/s small, 98 medium) and on numpy, and
  of ``Generator.generate_many`` over 8 different contexts (rows of different
  lengths), one sample each.
- cold start (small only, unless --skip-cold): wall time from launching
  ``gpt2-generate.py --gpu -1 --stream --max_length 200 --seed 1 --context 今日は``
  until the first byte on its stdout (target <= 8 s), best of 2; the time of
  ``python -c "import tensorflow"`` for reference; the CLI's peak RSS (from
  os.wait4 on that very child; target <= 1.2 GB).

The machines are shared and noisy (other processes come and go): every
figure is the best of 3 to 6 repeats (more while the best two disagree by
over 5%), and a bound sample is taken right before each repeat: "vs bound"
is best rate / best bound, "paired" the median of each repeat's rate over
the bound sampled just before it (robust to load that comes and goes).  A
ratio target counts as met when either figure meets it.  Cold start runs
first, while this process is still small (a child forked from a big process
may report that process's RSS as its own).
Prints a table to stdout; --json FILE also writes the figures as JSON.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")

CONTEXT = "今日は"
TARGET_RATIO = 0.8
#: 8 samples, float32 (issue 15: llama.cpp f32's aggregate on the reference machine).
TARGET_B8 = {"small": 277.0, "medium": 98.0}
TARGET_FIRST_TOKEN_S = 8.0
TARGET_RSS_SMALL_GB = 1.2


def best_of(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ensure_checkpoint(shape: str, directory: str) -> None:
    if os.path.isfile(os.path.join(directory, "checkpoint")):
        return
    print(f"[creating random {shape} checkpoint in {directory}]", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, os.path.join(REPO, "bench", "make_checkpoint.py"), shape, directory],
                   check=True)


# -- 1. bandwidth bound --------------------------------------------------------------------------


class Bound:
    """The numpy matrix-vector chain over one decoding step's weight bytes.

    ``sample()`` times a few chains now (the best of them); it is called
    right before every timed repeat below, so that each repeat has a bound
    measured under the same load, and the best over all samples is the bound.
    """

    def __init__(self, hp, w):
        self.mats = [w[f"model/h{i}/{k}"] for i in range(hp.n_layer)
                     for k in ("attn/c_attn/w", "attn/c_proj/w", "mlp/c_fc/w", "mlp/c_proj/w")]
        self.wte_t = w["model/wte"].T  # [E, V], the tied output projection
        self.xs = {n: np.ones((1, n), np.float32) for n in {m.shape[0] for m in self.mats} | {self.wte_t.shape[0]}}
        self.nbytes = sum(m.nbytes for m in self.mats) + self.wte_t.nbytes
        self.samples = []
        self.chain()

    def chain(self):
        xs = self.xs
        for m in self.mats:
            xs[m.shape[0]] @ m
        xs[self.wte_t.shape[0]] @ self.wte_t

    def sample(self, n=3) -> float:
        t = best_of(self.chain, repeats=n)
        self.samples.append(t)
        return t

    def best(self) -> float:
        return min(self.samples)

    def summary(self) -> dict:
        t = self.best()
        return {"seconds": t, "tokens_per_s": 1.0 / t, "gb_per_s": self.nbytes / t / 1e9, "weight_bytes": self.nbytes,
                "worst_sample_s": max(self.samples), "n_samples": len(self.samples)}


def repeat(measure, bound: Bound, min_reps: int = 3, max_reps: int = 6, agree: float = 0.05) -> dict:
    """Repeat ``measure()`` (returns a Timed run) until the best two agree within ``agree`` (at least
    ``min_reps``, at most ``max_reps`` times); a bound sample is taken before each repeat.

    ``ratio``: best rate / best bound; ``paired``: median over repeats of the rate over the
    bound sampled just before it (less sensitive to load that comes and goes).
    """
    rates, paired = [], []
    while len(rates) < max_reps:
        t_bound = bound.sample()
        rate = measure().rate
        rates.append(rate)
        paired.append(rate * t_bound)
        top = sorted(rates, reverse=True)
        if len(rates) >= min_reps and top[1] >= (1 - agree) * top[0]:
            break
    return {"tokens_per_s": max(rates), "runs": rates, "paired_ratio": float(np.median(paired))}


# -- 2/3. decoding -------------------------------------------------------------------------------


class Timed(NamedTuple):
    """What one timed run did: ``tokens`` decoded in ``seconds``."""

    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def decode_measure(dec, hp, batch: int, position: int, steps: int):
    """A function timing ``steps`` decoder steps of ``batch`` rows from ``position``."""
    rng = np.random.default_rng(position * 31 + batch)
    prompt = rng.integers(0, hp.n_vocab, (batch, position))
    tokens = rng.integers(0, hp.n_vocab, (steps + 2, batch))
    ids = list(range(batch))
    dec.clear()
    dec.add(ids, list(prompt))
    dec.step(ids, tokens[0])
    dec.step(ids, tokens[1])  # warm-up (cache allocated past position + 2)

    def measure():
        for i in ids:
            dec.truncate(i, position)
        t0 = time.perf_counter()
        for s in range(steps):
            dec.step(ids, tokens[s + 2])
        return Timed(batch * steps, time.perf_counter() - t0)

    return measure


class _Stop(Exception):
    pass


class _TimedEngine:
    """Wraps the Generator's engine: times step() entries (one per decoding
    step), stops after ``steps`` steps."""

    def __init__(self, inner, steps: int):
        self.inner = inner
        self.steps = steps
        self.times = []
        self.rows = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, ids, tokens):
        self.times.append(time.perf_counter())
        self.rows.append(len(ids))
        if len(self.times) > self.steps:
            raise _Stop
        return self.inner.step(ids, tokens)


CONTEXTS = ["今日は", "江戸時代の", "明日の天気は晴れでしょうか", "吾輩は猫である。名前はまだ無い。",
            "人工知能の研究は", "東京駅から新幹線に乗って", "昔々、ある所に", "この文章は"]


def _loop_measure(m, enc, steps: int, run, engine: str = "numpy"):
    """A function timing ``run(generator, options)`` (top_k 40, seed 1) over ``engine``'s decoder,
    prefills excluded.

    Between two step() entries the loop computes one step's logits, samples
    from them and assembles text: the tokens fed to the next step() are the
    ones produced in that interval.  The loop is stopped after ``steps`` steps.
    """
    import model
    from tasks.generate import GenerateOptions, Generator

    inner = model.decoder(m, engine=engine)
    options = GenerateOptions(top_k=40, max_length=10 ** 9, seed=1)

    def measure():
        engine = _TimedEngine(inner, steps)
        try:
            run(Generator(m, enc, decoder=engine), options)
        except _Stop:
            pass
        if len(engine.times) < 2:
            raise RuntimeError("generation ended before two steps")
        return Timed(sum(engine.rows[1:]), engine.times[-1] - engine.times[0])

    return measure


def generate_measure(m, enc, num: int, steps: int, engine: str = "numpy"):
    """Generator.generate with ``num`` samples of one context."""
    return _loop_measure(m, enc, steps, lambda g, options: g.generate(CONTEXT, num, options), engine)


def contexts_measure(m, enc, steps: int, batch_size: int = 8, engine: str = "numpy"):
    """Generator.generate_many over 8 different contexts, one sample each, as one batch."""
    return _loop_measure(m, enc, steps,
                         lambda g, options: list(g.generate_many(CONTEXTS, 1, options, batch_size=batch_size)),
                         engine)


# -- 4. cold start ---------------------------------------------------------------------------------


def _run_cli(cmd, env) -> tuple:
    """(seconds to the first stdout byte, seconds in all, peak RSS bytes) of one CLI run.

    The peak RSS comes from ``/usr/bin/time -f %M`` when it exists (the CLI is
    then forked from that small process), else from os.wait4 on the child.
    Either way this should run before the benchmark loads a model: a child
    forked from a big process can report that process's RSS as its own
    (Linux carries the pre-exec high-water mark into ru_maxrss).
    """
    with tempfile.TemporaryFile() as errf, tempfile.NamedTemporaryFile("r") as rssf:
        wrapped = os.access("/usr/bin/time", os.X_OK)
        full = ["/usr/bin/time", "-f", "%M", "-o", rssf.name, *cmd] if wrapped else cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=errf, bufsize=0, env=env, cwd=REPO)
        byte = proc.stdout.read(1)  # stdout is an unbuffered binary pipe
        t_first = time.perf_counter() - t0
        proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        t_total = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        errf.seek(0)
        err = errf.read().decode(errors="replace")
        if proc.returncode != 0 or not byte:
            raise RuntimeError(f"gpt2-generate.py failed ({proc.returncode}): {err[-2000:]}")
        if wrapped:
            peak = int(rssf.read().split()[-1]) * 1024
        else:
            peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    return t_first, t_total, peak


def cold_start(model_dir: str, vocab: str, runs: int = 2) -> dict:
    env = dict(os.environ)
    if vocab:
        env["GPT2JA_VOCAB"] = vocab
    cmd = [sys.executable, os.path.join(REPO, "gpt2-generate.py"), "--model", model_dir, "--gpu", "-1",
           "--num_generate", "1", "--stream", "--max_length", "200", "--seed", "1", "--context", CONTEXT]
    first, total, rss = zip(*(_run_cli(cmd, env) for _ in range(runs)))
    tf_times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tf_times.append(time.perf_counter() - t0)
    return {"first_byte_s": min(first), "first_byte_runs_s": list(first), "total_s": min(total),
            "peak_rss_bytes": max(rss), "peak_rss_runs_bytes": list(rss), "import_tensorflow_s": min(tf_times)}


# -- main ------------------------------------------------------------------------------------------


def bench_shape(shape: str, model_dir: str, enc, steps: int, batch8: bool) -> dict:
    import model
    from model.npdecode import NumpyDecoder, cpu_weights

    ensure_checkpoint(shape, model_dir)
    t0 = time.perf_counter()
    m = model.load(model_dir)
    load_s = time.perf_counter() - t0
    hp = m.hparams
    w = cpu_weights(m)
    r = {"dir": model_dir, "load_s": load_s, "n_params": hp.n_params}
    bound = Bound(hp, w)
    bound.sample(8)
    dec = NumpyDecoder(hp, w)
    r["decode_b1_pos8"] = repeat(decode_measure(dec, hp, 1, 8, steps), bound)
    r["decode_b1_pos300"] = repeat(decode_measure(dec, hp, 1, 300, steps), bound)
    # Bytes of keys and values a step reads there, which the bound does not count.
    r["kv_bytes_pos300"] = 2 * hp.n_layer * 300 * hp.n_embd * 4
    r["generate_b1"] = repeat(generate_measure(m, enc, 1, steps), bound)
    if batch8:
        r["decode_b8_pos8"] = repeat(decode_measure(dec, hp, 8, 8, steps), bound, max_reps=4)
        # what --engine auto decodes 8 samples with (float32 ONNX Runtime), and numpy for comparison
        r["generate_b8"] = repeat(generate_measure(m, enc, 8, steps, "onnx"), bound, min_reps=2, max_reps=3)
        r["generate_b8_numpy"] = repeat(generate_measure(m, enc, 8, steps), bound, min_reps=2, max_reps=3)
        r["contexts_b8"] = repeat(contexts_measure(m, enc, steps, engine="onnx"), bound, min_reps=2, max_reps=3)
    bound.sample(8)
    r["bound"] = bound.summary()
    return r


def print_table(results: dict) -> None:
    for shape, r in results.get("shapes", {}).items():
        b = r["bound"]
        bt = b["tokens_per_s"]
        print(f"{shape}: {r['n_params']:,} params, {r['dir']} (load {r['load_s']:.1f} s)")
        print(f"  {'bound (numpy matvec chain)':<36} {bt:7.1f} tok/s  {b['seconds'] * 1000:.1f} ms/step, "
              f"{b['weight_bytes'] / 1e6:.0f} MB -> {b['gb_per_s']:.1f} GB/s "
              f"(worst sample {b['worst_sample_s'] * 1000:.1f} ms)")
        print(f"  {'':<36} {'':7} {'':5}  vs bound  paired  target")
        rows = [("decode_b1_pos8", "NumpyDecoder.step b1 @pos 8", "ratio"),
                ("decode_b1_pos300", "NumpyDecoder.step b1 @pos 300", "ratio"),
                ("generate_b1", "Generator.generate b1 (top_k 40)", "ratio"),
                ("decode_b8_pos8", "NumpyDecoder.step b8 @pos 8 (sum)", "b8"),
                ("generate_b8", "Generator num=8, auto: onnx f32 (sum)", "b8"),
                ("generate_b8_numpy", "Generator num=8, numpy (sum)", ""),
                ("contexts_b8", "8 contexts x 1, auto: onnx f32 (sum)", "")]
        for key, label, kind in rows:
            if key not in r:
                continue
            v = r[key]["tokens_per_s"]
            ratio = v / bt
            paired = r[key]["paired_ratio"]
            if kind == "ratio":
                target = f">= {TARGET_RATIO}  {'ok' if max(ratio, paired) >= TARGET_RATIO else 'MISS'}"
            elif kind == "b8" and shape in TARGET_B8:
                want = TARGET_B8[shape]
                target = f">= {want:.0f} tok/s  {'ok' if v >= want else 'MISS'}"
            else:
                target = ""
            print(f"  {label:<36} {v:7.1f} tok/s  {ratio:8.2f}  {paired:6.2f}  {target}")
            if key == "decode_b1_pos300":
                kv = r["kv_bytes_pos300"]
                print(f"  {'':<36} (also reads {kv / 1e6:.0f} MB of keys/values per step: at the bound's "
                      f"bandwidth that is {b['weight_bytes'] / (b['weight_bytes'] + kv):.2f} x bound)")
    cold = results.get("cold_start")
    if cold:
        print("cold start (small, gpt2-generate.py --gpu -1 --stream --max_length 200, best of 2):")
        ft = cold["first_byte_s"]
        print(f"  {'first byte on stdout':<36} {ft:7.2f} s      runs "
              f"{', '.join(f'{x:.2f}' for x in cold['first_byte_runs_s'])}; target <= {TARGET_FIRST_TOKEN_S:.0f} s  "
              f"{'ok' if ft <= TARGET_FIRST_TOKEN_S else 'MISS'}")
        label = 'python -c "import tensorflow"'
        print(f"  {label:<36} {cold['import_tensorflow_s']:7.2f} s")
        print(f"  {'whole run':<36} {cold['total_s']:7.2f} s")
        gb = cold["peak_rss_bytes"] / 1e9
        print(f"  {'peak RSS of the CLI':<36} {gb:7.2f} GB     target <= {TARGET_RSS_SMALL_GB} GB  "
              f"{'ok' if gb <= TARGET_RSS_SMALL_GB else 'MISS'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,medium", help="comma-separated shapes (default small,medium)")
    parser.add_argument("--dir-small", default="/tmp/gpt2ja-small-rand")
    parser.add_argument("--dir-medium", default="/tmp/gpt2ja-medium-rand")
    parser.add_argument("--dir-large", default="/tmp/gpt2ja-large-rand")
    parser.add_argument("--dir-tiny", default="/tmp/gpt2ja-tiny-rand")
    parser.add_argument("--steps", type=int, default=64, help="decoding steps timed per repeat (default 64)")
    parser.add_argument("--batch-shapes", default="small", help="shapes measured at batch 8 (default small)")
    parser.add_argument("--skip-cold", action="store_true", help="skip the CLI cold-start measurement")
    parser.add_argument("--vocab", default=None, help="vocabulary directory (default: encoder/)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    batch_shapes = {s for s in args.batch_shapes.split(",") if s}

    import encoder
    import model

    for s in shapes:
        if s not in model.RELEASED:
            parser.error(f"unknown shape {s!r} (one of {', '.join(sorted(model.RELEASED))})")
    enc = encoder.load(args.vocab)
    results = {"steps": args.steps, "cpus": os.cpu_count(), "shapes": {}}
    t_start = time.perf_counter()
    if not args.skip_cold and "small" in shapes:
        # First, while this process is small (see _run_cli).
        ensure_checkpoint("small", args.dir_small)
        results["cold_start"] = cold_start(args.dir_small, args.vocab)
    for s in shapes:
        d = getattr(args, f"dir_{s}")
        results["shapes"][s] = bench_shape(s, d, enc, args.steps, s in batch_shapes)
        gc.collect()  # let the model go before the next shape
    results["bench_s"] = time.perf_counter() - t_start
    print_table(results)
    print(f"(steps {args.steps}, {os.cpu_count()} CPUs, bench {results['bench_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
