"""gpt2-bulk.py transform on a local Ray cluster against gpt2-transform.py --input, same lines, same run.

    python bench/bench_bulk.py [--model DIR] [--lines 2000] [--shard_lines 250] [--text FILE]

Runs, each a fresh process, on the first N lines of --text (default: the
repository's synthetic golden texts):

* ``gpt2-transform.py --input FILE --format npy`` (all CPUs, its default);
* ``gpt2-bulk.py transform`` on a local cluster with 2 actors x 1 thread
  (target: at least 0.8 x gpt2-transform.py's vectors/s);
* the same with 1 actor x 1 thread (how the rate grows with actors).

Two figures per run: vectors/s as the tool itself reports it with --verbose
(the computation: for bulk, from the first actor starting to the last shard
written, actor start-up and model loading included) and vectors/s over the
whole command (process start, TensorFlow import, Ray start, everything).
The vectors of the bulk runs are checked against gpt2-transform.py's (1e-5).
The model defaults to /tmp/gpt2ja-small-rand, written by
``bench/make_checkpoint.py small`` when missing.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from texts import add_text_flag, read_texts

ROOT = pathlib.Path(__file__).resolve().parent.parent


def ensure_model(path: str, shape: str = "small") -> str:
    if not os.path.isfile(os.path.join(path, "checkpoint")):
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_checkpoint.py"), shape, path], check=True)
    return path


def run(command, pattern: str):
    """(wall seconds, the tool's own lines/s from its --verbose line)."""
    t0 = time.perf_counter()
    p = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    found = re.findall(pattern, p.stderr)
    if not found:
        sys.exit(f"no timing line in the output of {' '.join(command[:3])}:\n{p.stderr[-2000:]}")
    return wall, float(found[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/gpt2ja-small-rand")
    p.add_argument("--lines", type=int, default=2000)
    p.add_argument("--shard_lines", type=int, default=250)
    add_text_flag(p)
    args = p.parse_args()
    ensure_model(args.model)
    texts = read_texts(args.text, args.lines)
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        src = os.path.join(tmp, "lines.txt")
        with open(src, "w", encoding="utf-8") as f:
            f.write("\n".join(texts) + "\n")
        npy = os.path.join(tmp, "cli.npy")
        py = sys.executable
        results = {}
        wall, rate = run([py, "gpt2-transform.py", "--model", args.model, "--input", src, "--format", "npy",
                          "--output_file", npy, "--verbose"], r"vectors: \d+ in [\d.]+ s \(([\d.]+)/s\)")
        results["gpt2-transform.py --input (all CPUs)"] = (wall, rate)
        expected = np.load(npy)
        for workers in (2, 1):
            out = os.path.join(tmp, f"bulk{workers}")
            wall, rate = run([py, "gpt2-bulk.py", "transform", "--model", args.model, "--input", src, "--output", out,
                              "--workers", str(workers), "--threads", "1", "--shard_lines", str(args.shard_lines),
                              "--verbose"], r"transform: \d+ lines in [\d.]+ s \(([\d.]+) lines/s\)")
            results[f"gpt2-bulk.py transform, {workers} actor(s) x 1 thread"] = (wall, rate)
            table = pq.read_table(out).sort_by("line")
            got = np.asarray(table["vector"].combine_chunks().flatten()).reshape(len(texts), -1)
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

    n = len(texts)
    print(f"{n} lines of {args.text}, model {args.model}, {os.cpu_count()} CPUs")
    print(f"{'run':<48} {'vectors/s (tool)':>17} {'vectors/s (wall)':>17} {'wall s':>8}")
    for name, (wall, rate) in results.items():
        print(f"{name:<48} {rate:>17.1f} {n / wall:>17.1f} {wall:>8.1f}")
    base = results["gpt2-transform.py --input (all CPUs)"]
    two = results["gpt2-bulk.py transform, 2 actor(s) x 1 thread"]
    one = results["gpt2-bulk.py transform, 1 actor(s) x 1 thread"]
    print(f"bulk 2x1 / gpt2-transform.py: {two[1] / base[1]:.2f} x (tool rates; target >= 0.8), "
          f"{base[0] / two[0]:.2f} x (wall)")
    print(f"bulk 2 actors / 1 actor: {two[1] / one[1]:.2f} x (tool rates), {one[0] / two[0]:.2f} x (wall)")
    print("vectors of both bulk runs equal gpt2-transform.py's within 1e-5")


if __name__ == "__main__":
    main()
