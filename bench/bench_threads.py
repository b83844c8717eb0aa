#!/usr/bin/env python3
"""Decoding on a loaded machine: batch-1 tokens/s, quiet and beside one busy process.

    python bench/bench_threads.py [--model DIR] [--tokens N] [--rounds R]

For each thread policy -- the default (all CPUs, decoding steps tuned by
timing, see model/threads.py), --threads 1, and all CPUs fixed -- the full
generation loop (Generator.generate, top_k 40, one sample) is timed on a quiet
machine and again while one other process spins on a core, in interleaved
rounds; the figure is the median tokens/s and the busy/quiet ratio (the bar:
the default keeps at least 0.4x of its quiet speed).  Then the command-line
tool is timed with and without `timeout` in front (a background process group;
the bar: at least 0.9x).  Default model: a random small-shape checkpoint in
/tmp/gpt2ja-small-rand (written when missing).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONTEXT = "吾輩は猫である。名前はまだ無い。"


def ensure_model(path: str) -> None:
    if not os.path.isdir(path):
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_checkpoint.py"), "small", path], check=True)


class Busy:
    """One process spinning on a core for the duration of a ``with`` block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def decode_rate(m, enc, threads, tokens: int) -> float:
    import model
    from tasks.generate import GenerateOptions, Generator

    model.configure_threads(threads)  # the decoder reads the policy when it is made
    gen = Generator(m, enc, engine="numpy")
    gen.generate(CONTEXT, 1, GenerateOptions(top_k=40, max_length=tokens, seed=1))
    return gen.stats.tokens / gen.stats.decode_seconds


def cli_seconds(model_dir: str, prefix) -> float:
    cmd = [*prefix, sys.executable, os.path.join(ROOT, "gpt2-generate.py"), "--model", model_dir, "--gpu", "-1",
           "--num_generate", "1", "--seed", "1", "--max_length", "200", "--context", CONTEXT]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/gpt2ja-small-rand")
    p.add_argument("--tokens", type=int, default=150, help="tokens per timed generation (default 150)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    ensure_model(args.model)

    import encoder
    import model

    enc = encoder.load()
    m = model.load(args.model)
    cpus = model.cpu_count()
    policies = {"default (tuned)": None, "--threads 1": 1, f"--threads {cpus} (fixed)": cpus}
    rates = {(name, load): [] for name in policies for load in ("quiet", "busy")}
    for _ in range(args.rounds):
        for name, threads in policies.items():
            rates[(name, "quiet")].append(decode_rate(m, enc, threads, args.tokens))
            with Busy():
                rates[(name, "busy")].append(decode_rate(m, enc, threads, args.tokens))
    print(f"batch-1 decoding, small shape, {cpus} CPUs, median of {args.rounds} interleaved rounds")
    for name in policies:
        quiet = statistics.median(rates[(name, "quiet")])
        busy = statistics.median(rates[(name, "busy")])
        print(f"  {name:22s} quiet {quiet:6.1f} tok/s   one busy process {busy:6.1f} tok/s   ratio {busy / quiet:.2f}")
    plain, timed = [], []
    for _ in range(args.rounds):
        plain.append(cli_seconds(args.model, []))
        timed.append(cli_seconds(args.model, ["timeout", "600"]))
    a, b = statistics.median(plain), statistics.median(timed)
    print(f"gpt2-generate.py, 200 characters: {a:.2f} s; under timeout: {b:.2f} s (speed ratio {a / b:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
