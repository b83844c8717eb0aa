#!/usr/bin/env python3
"""Cold start of gpt2-generate.py: seconds from launch to exit for one generated token, and peak RSS.

    python bench/bench_cold_start.py [MODEL_DIR] [--runs 5] [--formats fp32,q8,q4] [--rss-runs 3]

For each weight format, in a model cache of its own (a fresh ``$GPT2JA_HOME``):
the first run (float32: the checkpoint read by TensorFlow, which checks it, then
remembered; every format: the ONNX step graph built and kept) and the median of
``--runs`` later runs (float32 memory-mapped without TensorFlow; no graph built,
``onnx`` not imported).  The quantized weights come from the cache beside the
checkpoint (made by a first run when missing, not timed).  The bound, measured in
the same run: a Python that imports numpy and onnxruntime and exits -- the floor
of any Python tool decoding with ONNX Runtime.  Rounds are interleaved.  The CPU's
model name and ISA flags are printed with the figures.

Peak RSS of quantized decoding (the formats q8 and q4 among --formats): the child's
peak resident set (``ru_maxrss`` of ``os.wait4``: its VmHWM at exit) for one sample
of 64 tokens and for ``--num_generate 8`` samples of 64 tokens, cache and graph
present (later runs), the median of ``--rss-runs`` interleaved runs, beside the
bound ``import numpy, onnxruntime`` and, for the small shape, issue 26's targets:
llama.cpp's peak (q8_0 / q4_0: 136 MB at batch 1, 202 MB at 8 sequences) + 150 MB.
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


#: Tokens decoded by the peak-RSS runs.
DECODE_TOKENS = 64
#: Issue 26's peak-RSS targets, small shape, by samples: llama.cpp's q8_0/q4_0 peak (136 MB at batch 1,
#: 202 MB with 8 sequences) + 150 MB.
TARGET_MB = {1: 286, 8: 352}


def _is_small(model_dir) -> bool:
    """Whether the model directory holds the small shape (12 layers, 768 wide)."""
    import json

    try:
        with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
            hp = json.load(f)
    except (OSError, ValueError):
        return False
    return hp.get("n_layer") == 12 and hp.get("n_embd") == 768


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
    ap.add_argument("--rss-runs", type=int, default=3,
                    help="runs of each quantized decoding whose peak RSS is reported (0: none)")
    args = ap.parse_args(argv)
    formats = args.formats.split(",")
    def gen(fmt, samples=1, tokens=1):
        return ([sys.executable, os.path.join(ROOT, "gpt2-generate.py"), "--model", args.model_dir, "--gpu", "-1",
                 "--num_generate", str(samples), "--max_length", str(tokens), "--top_k", "1", "--context", "今日は"]
                + ([] if fmt == "fp32" else ["--quantize", fmt]))

    bound_cmd = [sys.executable, "-c", "import numpy, onnxruntime"]
    base_env = {k: v for k, v in os.environ.items() if k != "GPT2JA_HOME"}
    info = machine()
    print(f"CPU: {info.get('cpu', '?')}; {' '.join(info.get('isa', []))}; load {info['load'][0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        homes = {f: os.path.join(tmp, f) for f in formats}
        cmds = {f: gen(f) for f in formats}
        for f in formats:  # the quantized weights beside the checkpoint, made once if missing (not timed)
            if f != "fp32":
                _run(cmds[f], {**base_env, "GPT2JA_HOME": os.path.join(tmp, "prepare")})
        first = {f: _run(cmds[f], {**base_env, "GPT2JA_HOME": homes[f]}) for f in formats}
        later = {f: [] for f in formats}
        bound = []
        for _ in range(args.runs):
            bound.append(_run(bound_cmd, base_env))
            for f in formats:
                later[f].append(_run(cmds[f], {**base_env, "GPT2JA_HOME": homes[f]}))
        quantized = [f for f in formats if f != "fp32"]
        decode = {(f, n): gen(f, n, DECODE_TOKENS) for f in quantized for n in (1, 8)}
        rss = {k: [] for k in decode}
        for _ in range(args.rss_runs):
            for (f, n), cmd in decode.items():
                rss[f, n].append(_run(cmd, {**base_env, "GPT2JA_HOME": homes[f]})[1])
    b = statistics.median(w for w, _ in bound)
    b_rss = statistics.median(r for _, r in bound)
    print(f"bound (python -c 'import numpy, onnxruntime'): {b:.2f} s, peak RSS {b_rss:.0f} MB "
          f"(median of {args.runs})")
    print("format  first run s  later runs s (median)  x bound  peak RSS later MB  first MB")
    for f in formats:
        wall = statistics.median(w for w, _ in later[f])
        peak = statistics.median(r for _, r in later[f])
        print(f"{f:6}  {first[f][0]:11.2f}  {wall:21.2f}  {wall / b:7.2f}  {peak:17.0f}  {first[f][1]:8.0f}")
    if args.rss_runs and quantized:
        print(f"peak RSS (VmHWM) of quantized decoding, {DECODE_TOKENS} tokens, MB (median of {args.rss_runs}); "
              f"target: llama.cpp's + 150 MB")
        small = _is_small(args.model_dir)  # the targets are the small shape's
        print("format  1 sample  target  8 samples  target")
        for f in quantized:
            one, eight = (statistics.median(rss[f, n]) for n in (1, 8))
            t1, t8 = (str(TARGET_MB[n]) if small else "-" for n in (1, 8))
            print(f"{f:6}  {one:8.0f}  {t1:>6}  {eight:9.0f}  {t8:>6}")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
