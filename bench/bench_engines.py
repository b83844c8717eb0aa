#!/usr/bin/env python3
"""Which float32 CPU decoder: numpy vs ONNX Runtime (with and without MLAS's pre-packed weights).

    python bench/bench_engines.py --model bench/out/small --model bench/out/medium [--rounds 3]

For each model: tokens/s of decoder steps at 1 and 8 rows (``--steps`` steps from position 8 and
from position 500, rounds interleaved across the engines so that load that comes and goes hits
all of them; medians of the rounds), and the peak RSS of a process that loads the model, makes
the decoder and decodes 8 rows x 64 tokens (each engine in a fresh process; ``load only`` is the
same process without a decoder).  Prints the machine (lscpu model name and ISA flags) and the load
average before and after, and writes JSON to --json when asked.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

ENGINES = {
    "numpy": dict(engine="numpy"),
    "onnx": dict(engine="onnx", prepack=True),
    "onnx (no prepacking)": dict(engine="onnx", prepack=False),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def machine() -> dict:
    info = {"load": os.getloadavg()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line.split(":", 1)[1].split()
                info["isa"] = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
    except OSError:
        pass
    return info


def make(m, spec):
    import model
    from model.ortdecode import OnnxDecoder

    if spec["engine"] == "numpy":
        return model.decoder(m, engine="numpy")
    return OnnxDecoder.from_model(m) if spec["prepack"] else OnnxDecoder(m.hparams, _weights(m), prepack=False)


def _weights(m):
    from model.npdecode import cpu_weights
    return cpu_weights(m)


def steps_rate(dec, hp, rows: int, position: int, steps: int) -> float:
    rng = np.random.default_rng(position + rows)
    ids = list(range(rows))
    dec.clear()
    dec.add(ids, list(rng.integers(0, hp.n_vocab, (rows, position))))
    tokens = rng.integers(0, hp.n_vocab, (steps + 1, rows))
    dec.step(ids, tokens[0])  # warm-up
    t0 = time.perf_counter()
    for s in range(steps):
        dec.step(ids, tokens[s + 1])
    return rows * steps / (time.perf_counter() - t0)


def rss_child(model_dir: str, engine: str) -> None:
    import model
    m = model.load(model_dir)
    if engine != "load only":
        dec = make(m, ENGINES[engine])
        ids = list(range(8))
        dec.add(ids, [[1, 2, 3, 4, 5, 6, 7, 8]] * 8)
        for t in range(64):
            dec.step(ids, [t + 10] * 8)
    # VmHWM, not ru_maxrss: the latter carries the high-water mark of the process this one was forked from
    with open("/proc/self/status") as f:
        print(next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="model directory (repeatable)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return 0
    import model

    results = {"machine_before": machine(), "models": {}}
    log(results["machine_before"])
    for d in args.model:
        m = model.load(d)
        hp = m.hparams
        decs = {name: make(m, spec) for name, spec in ENGINES.items()}
        runs = {}
        for r in range(args.rounds):
            for rows in (1, 8):
                for position in (8, 500):
                    for name, dec in decs.items():
                        rate = steps_rate(dec, hp, rows, position, args.steps)
                        runs.setdefault(f"{name} b{rows} pos{position}", []).append(rate)
            log(f"{d}: round {r + 1} done, load {os.getloadavg()[0]:.1f}")
        speed = {k: {"median": float(np.median(v)), "runs": v} for k, v in runs.items()}
        del decs, m
        rss = {}
        for engine in ["load only", *ENGINES]:
            out = subprocess.run([sys.executable, __file__, "--model", d, "--rss-child", d, engine],
                                 capture_output=True, text=True)
            rss[engine] = int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
        results["models"][d] = {"speed": speed, "peak_rss_mb": rss, "shape": [hp.n_layer, hp.n_embd]}
        for k, v in speed.items():
            print(f"{os.path.basename(d)}\t{k}\t{v['median']:.1f} tok/s")
        for k, v in rss.items():
            print(f"{os.path.basename(d)}\tpeak RSS {k}\t{v} MB")
    results["machine_after"] = machine()
    log(results["machine_after"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
