#!/usr/bin/env python3
"""Cold start of gpt2-generate.py: seconds from launch to exit for one generated token, and peak RSS.

    python bench/bench_cold_start.py [MODEL_DIR] [--runs 5] [--formats fp32,q8,q4]

For each weight format, in a model cache of its own (a fresh ``$GPT2JA_HOME``):
the first run (float32: the checkpoint read by TensorFlow, which checks it, then
remembered; every format: the ONNX step graph built and kept) and the median of
``--runs`` later runs (float32 memory-mapped without TensorFlow; no graph built,
``onnx`` not imported).  The quantized weights come from the cache beside the
checkpoint (made by a first run when missing, not timed).  The bound, measured in
the same run: a Python that imports numpy and onnxruntime and exits -- the floor
of any Python tool decoding with ONNX Runtime.  Rounds are interleaved.  The CPU's
model name and ISA flags are printed with the figures.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_engines import machine  # noqa: E402


def _run(cmd, env):
    """(wall seconds, peak RSS MB) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"bench_cold_start: {' '.join(cmd)} failed:\n{err}")
    return wall, usage.ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?", default=os.path.join(ROOT, "bench", "out", "small"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--formats", default="fp32,q8,q4")
    args = ap.parse_args(argv)
    formats = args.formats.split(",")
    gen = [sys.executable, os.path.join(ROOT, "gpt2-generate.py"), "--model", args.model_dir, "--gpu", "-1",
           "--num_generate", "1", "--max_length", "1", "--top_k", "1", "--context", "今日は"]
    bound_cmd = [sys.executable, "-c", "import numpy, onnxruntime"]
    base_env = {k: v for k, v in os.environ.items() if k != "GPT2JA_HOME"}
    info = machine()
    print(f"CPU: {info.get('cpu', '?')}; {' '.join(info.get('isa', []))}; load {info['load'][0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        homes = {f: os.path.join(tmp, f) for f in formats}
        cmds = {f: gen + ([] if f == "fp32" else ["--quantize", f]) for f in formats}
        for f in formats:  # the quantized weights beside the checkpoint, made once if missing (not timed)
            if f != "fp32":
                _run(cmds[f], {**base_env, "GPT2JA_HOME": os.path.join(tmp, "prepare")})
        first = {f: _run(cmds[f], {**base_env, "GPT2JA_HOME": homes[f]}) for f in formats}
        later = {f: [] for f in formats}
        bound = []
        for _ in range(args.runs):
            bound.append(_run(bound_cmd, base_env)[0])
            for f in formats:
                later[f].append(_run(cmds[f], {**base_env, "GPT2JA_HOME": homes[f]}))
    b = statistics.median(bound)
    print(f"bound (python -c 'import numpy, onnxruntime'): {b:.2f} s (median of {args.runs})")
    print("format  first run s  later runs s (median)  x bound  peak RSS later MB  first MB")
    for f in formats:
        wall = statistics.median(w for w, _ in later[f])
        rss = statistics.median(r for _, r in later[f])
        print(f"{f:6}  {first[f][0]:11.2f}  {wall:21.2f}  {wall / b:7.2f}  {rss:17.0f}  {first[f][1]:8.0f}")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
