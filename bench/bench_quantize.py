#!/usr/bin/env python3
"""8-/4-bit decoding (``--quantize``, ONNX Runtime): speed, quantization time, memory, and quality.

    python bench/bench_quantize.py [--shapes small,medium] [--dir-small DIR] [--dir-medium DIR]
                                   [--steps 32] [--skip-speed] [--skip-rss] [--skip-kld]
                                   [--train-steps 300] [--text FILE] [--json FILE]

Speed (per shape; random checkpoints from bench/make_checkpoint.py, made under /tmp when missing):

- bound: the numpy float32 matrix-vector chain over one decoding step's weights
  (``bench_generate.Bound``), sampled before every timed repeat in this run;
- the same chain with one OpenBLAS thread (when threadpoolctl is installed): on a loaded machine
  2-thread OpenBLAS collapses and this is the steadier reference;
- tokens/s of decoder steps (``decode_measure``: --steps steps from position 8) at 1 and 8 rows, for
  the numpy engine (float32, the default) and the onnx engine with float32, q8 and q4 weights; each
  as best of repeats and as "x bound" (best rate / best bound; with 8 rows the aggregate rate over
  the single-row bound);
- quantization: seconds of ``quantize.quantize_weights`` alone, of a first ``model.decoder(m,
  quantize=...)`` with an empty cache (quantize, write the cache, build the session), and of a
  second one reading the cache.

Peak RSS (per shape, ``/usr/bin/time -f %M`` or os.wait4): ``python -c "import tensorflow"`` alone,
and gpt2-generate.py decoding 64 tokens with float32 weights, with --quantize q8 and with q4 (their
cache files made beforehand, as after a first run).  Bars (issue 15): q8 small at most 250 MB above
TensorFlow itself; q4 medium at most 0.45 x the float32 run.

Quality (KLD): a copy of the tiny test checkpoint is fine-tuned for --train-steps steps
(``tasks.train.Trainer``, chunks of 128 tokens of ``tasks.dataset.Chunks``, Adam 3e-3, batch 8)
on texts of --text (default: the repository's golden texts), saved and loaded again; then on
held-out texts (not trained on) every position's next-token distribution of q8 and q4 decoding
(teacher-forced decoder steps) is compared with the float32 numpy engine's: mean KL(fp32 || q),
top-1 agreement, and perplexities.  Bars (issue 15): q8 KLD <= 0.002 and top-1 >= 98%; q4 KLD
<= 0.05 and top-1 >= 90%.

Prints a table to stdout; --json FILE also writes the figures.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")

from texts import add_text_flag, read_texts  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(REPO, "bench", "bench_generate.py"))
bg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bg)

FORMATS = ("q8", "q4")
BARS = {"q8": (0.002, 0.98), "q4": (0.05, 0.90)}
TINY = os.path.join(REPO, "tests", "data", "gpt2ja-tiny")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# -- speed ------------------------------------------------------------------------------------


def decoders(m, formats=FORMATS, fp32_onnx=True):
    """name -> decoder: numpy (float32), onnx-f32, onnx-q8, onnx-q4."""
    import model
    out = {"numpy f32": model.decoder(m, engine="numpy")}
    if fp32_onnx:
        out["onnx f32"] = model.decoder(m, engine="onnx")
    for fmt in formats:
        out[f"onnx {fmt}"] = model.decoder(m, quantize=fmt)
    return out


class OneThreadBound(bg.Bound):
    """The same chain with OpenBLAS on one thread (threadpoolctl): when other processes hold the
    cores, 2-thread OpenBLAS collapses (its threads wait on each other), and this one does not."""

    def chain(self):
        from threadpoolctl import threadpool_limits
        with threadpool_limits(1):
            super().chain()


def speed(m, steps: int, batches=(1, 8), position: int = 8, formats=FORMATS) -> dict:
    """Tokens/s of decoder steps for every engine and batch, with the same-run bound (and, when
    threadpoolctl is installed, the bound with one OpenBLAS thread)."""
    from model.npdecode import cpu_weights

    hp = m.hparams
    bound = bg.Bound(hp, cpu_weights(m))
    try:
        one = OneThreadBound(hp, cpu_weights(m))
    except ImportError:
        one = None
    decs = decoders(m, formats)
    rows = {}
    for batch in batches:
        for name, dec in decs.items():
            r = bg.repeat(bg.decode_measure(dec, hp, batch, position, steps), bound)
            rows[f"{name} b{batch}"] = r
            if one is not None:
                one.sample()
            log(f"  {name} b{batch}: {r['tokens_per_s']:.1f} tok/s")
        # interleave: a second pass over the engines so that load that comes and goes hits all of them
        for name, dec in decs.items():
            r = bg.repeat(bg.decode_measure(dec, hp, batch, position, steps), bound, min_reps=2, max_reps=3)
            old = rows[f"{name} b{batch}"]
            old["runs"] += r["runs"]
            old["tokens_per_s"] = max(old["runs"])
            old["paired_ratio"] = float(np.median([old["paired_ratio"], r["paired_ratio"]]))
    b = bound.summary()
    for r in rows.values():
        r["x_bound"] = r["tokens_per_s"] / b["tokens_per_s"]
    out = {"bound": b, "decode": rows}
    if one is not None:
        out["bound_1thread"] = one.summary()
    return out


def quantize_times(m, formats=FORMATS) -> dict:
    """Seconds to quantize (arrays only), to make a first decoder with an empty cache, to make one from the cache."""
    from model import quantize
    from model.npdecode import cpu_weights
    from model.ortdecode import OnnxDecoder

    out = {}
    w = cpu_weights(m)
    with tempfile.TemporaryDirectory() as root:
        for fmt in formats:
            t0 = time.perf_counter()
            quantize.quantize_weights(w, m.hparams, fmt)
            t_q = time.perf_counter() - t0
            # an empty cache: beside links to the checkpoint's files in a new directory
            d = os.path.join(root, fmt)
            os.makedirs(d)
            base = os.path.basename(m.path)
            for f in os.listdir(os.path.dirname(m.path)):
                if f.startswith(base + "."):
                    os.symlink(os.path.join(os.path.dirname(m.path), f), os.path.join(d, f))
            prefix = os.path.join(d, base)
            t0 = time.perf_counter()
            dec = OnnxDecoder(m.hparams, w, quantize.load_or_make(w, prefix, fmt, m.hparams))
            t_first = time.perf_counter() - t0
            assert dec.quantized_now, "the cache was not empty"
            t0 = time.perf_counter()
            dec2 = OnnxDecoder(m.hparams, w, quantize.load_or_make(w, prefix, fmt, m.hparams))
            t_cached = time.perf_counter() - t0
            assert not dec2.quantized_now
            out[fmt] = {"quantize_s": t_q, "first_decoder_s": t_first, "cached_decoder_s": t_cached,
                        "cache_bytes": os.path.getsize(dec.quantized_path)}
            del dec, dec2
    return out


# -- peak RSS ---------------------------------------------------------------------------------


def peak_rss(command) -> int:
    """Peak RSS in bytes of ``command`` (``/usr/bin/time -f %M``, or os.wait4)."""
    with tempfile.NamedTemporaryFile("r") as out:
        if os.access("/usr/bin/time", os.X_OK):
            subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out.name, *command], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return int(out.read().strip().splitlines()[-1]) * 1024
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            raise RuntimeError(f"{command} failed")
        return usage.ru_maxrss * 1024


def generate_command(directory: str, fmt=None, tokens: int = 64):
    """gpt2-generate.py decoding ``tokens`` tokens of one sample (float32, or ``fmt`` weights)."""
    command = [sys.executable, os.path.join(REPO, "gpt2-generate.py"), "--model", directory, "--gpu", "-1",
               "--context", "江戸時代のインターネット回線について、", "--num_generate", "1", "--seed", "1",
               "--max_tokens", str(tokens), "--max_length", "100000"]
    return command + (["--quantize", fmt] if fmt else [])


def rss(directory: str, formats=FORMATS) -> dict:
    """Peak RSS of ``import tensorflow`` alone, and of gpt2-generate.py decoding 64 tokens with float32
    weights and with each format (its cache file made beforehand: a steady-state run)."""
    for fmt in formats:
        subprocess.run([sys.executable, "-m", "model", "quantize", directory, fmt], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {"tensorflow itself": peak_rss([sys.executable, "-c", "import tensorflow"]),
           "numpy f32": peak_rss(generate_command(directory))}
    for fmt in formats:
        out[f"onnx {fmt}"] = peak_rss(generate_command(directory, fmt))
    return out


# -- quality: KL divergence on a trained tiny model ---------------------------------------------


def encode_texts(enc, texts):
    return [np.asarray(enc.encode(t) + [enc.eos_id], np.int32) for t in texts if t.strip()]


def train_tiny(out_dir: str, enc, texts, steps: int, chunk: int = 128, batch: int = 8, lr: float = 3e-3,
               seed: int = 0) -> dict:
    """Fine-tune a copy of the tiny checkpoint on ``texts`` for ``steps`` steps; saved to ``out_dir``."""
    import model
    from tasks.dataset import Chunks, Sampler
    from tasks.train import Trainer

    m = model.load(TINY)
    chunks = Chunks.from_arrays(encode_texts(enc, texts), chunk, enc.eos_id)
    trainer = Trainer(m, optim="adam", learning_rate=lr)
    sampler = Sampler(len(chunks), seed=seed)
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        ids, lens = chunks.batch(sampler.next(batch))
        losses.append(trainer.train_step(ids, lens))
    seconds = time.perf_counter() - t0
    model.save(m, out_dir, step=steps)
    return {"steps": steps, "seconds": seconds, "first_loss": float(np.mean(losses[:10])),
            "last_loss": float(np.mean(losses[-10:])), "chunks": len(chunks)}


def teacher_forced_logits(dec, seqs, rows: int = 16):
    """Every position's next-token logits of ``seqs`` (each [t0, t1, ...]) through decoder steps:
    the logits after t0, after t0 t1, ..., up to the second-to-last token (so each has a target)."""
    out = []
    for start in range(0, len(seqs), rows):
        group = seqs[start:start + rows]
        dec.clear()
        first = dec.add(range(len(group)), [s[:1] for s in group])
        per = [[first[j]] for j in range(len(group))]
        longest = max(len(s) for s in group)
        for t in range(1, longest - 1):
            going = [j for j, s in enumerate(group) if t < len(s) - 1]
            logits = dec.step(going, [group[j][t] for j in going])
            for k, j in enumerate(going):
                per[j].append(logits[k])
        for j, s in enumerate(group):
            out.append(np.stack(per[j][:len(s) - 1]))
    return out


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref_logits, got_logits, targets) -> dict:
    """Mean KL(ref || got), top-1 agreement, and both perplexities over all positions."""
    lp, lq = _log_softmax(ref_logits), _log_softmax(got_logits)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    rows = np.arange(len(targets))
    return {"positions": int(len(targets)), "mean_kld": float(kld.mean()), "max_kld": float(kld.max()),
            "top1_agreement": float(np.mean(ref_logits.argmax(-1) == got_logits.argmax(-1))),
            "ppl_ref": float(np.exp(-lp[rows, targets].mean())), "ppl": float(np.exp(-lq[rows, targets].mean()))}


def kld(enc, texts, train_steps: int, min_positions: int = 2000, model_dir=None, formats=FORMATS) -> dict:
    """Train the tiny model (or use ``model_dir``), then compare q8/q4 with float32 on held-out texts."""
    import model
    from model.npdecode import NumpyDecoder

    texts = [t for t in texts if t.strip()]
    held, train = [], []
    for i, t in enumerate(texts):  # every 10th text is held out
        (held if i % 10 == 0 else train).append(t)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model_dir = os.path.join(tmp, "tiny-trained")
            result["training"] = train_tiny(model_dir, enc, train, train_steps)
            log(f"  trained: {result['training']}")
        m = model.load(model_dir)
        seqs, count = [], 0
        for ids in encode_texts(enc, held):
            ids = [enc.eos_id] + [int(t) for t in ids][: m.hparams.n_ctx - 1]  # predict the first token too
            seqs.append(ids)
            count += len(ids) - 1
            if count >= min_positions:
                break
        targets = np.concatenate([s[1:] for s in seqs])
        ref = np.concatenate(teacher_forced_logits(NumpyDecoder.from_model(m), seqs))
        for fmt in formats:
            got = np.concatenate(teacher_forced_logits(model.decoder(m, quantize=fmt), seqs))
            result[fmt] = compare(ref, got, targets)
            bar_kld, bar_top1 = BARS[fmt]
            result[fmt]["meets_bars"] = bool(result[fmt]["mean_kld"] <= bar_kld and
                                             result[fmt]["top1_agreement"] >= bar_top1)
        if os.path.isdir(os.path.join(tmp, "tiny-trained")):
            shutil.rmtree(os.path.join(tmp, "tiny-trained"))
    return result


# -- main -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="small")
    p.add_argument("--dir-small", default="/tmp/gpt2ja-small-rand")
    p.add_argument("--dir-medium", default="/tmp/gpt2ja-medium-rand")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-kld", action="store_true")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--json", default=None)
    add_text_flag(p)
    args = p.parse_args(argv)
    import encoder
    import model

    figures = {}
    shapes = [s for s in args.shapes.split(",") if s]
    if not args.skip_rss:
        for shape in shapes:
            d = getattr(args, f"dir_{shape}")
            bg.ensure_checkpoint(shape, d)
            log(f"peak RSS, {shape}")
            figures[f"rss_{shape}"] = rss(d)
    if not args.skip_speed:
        for shape in shapes:
            d = getattr(args, f"dir_{shape}")
            bg.ensure_checkpoint(shape, d)
            log(f"speed, {shape}")
            m = model.load(d)
            figures[f"quantize_{shape}"] = quantize_times(m)
            figures[f"speed_{shape}"] = speed(m, args.steps)
            del m
    if not args.skip_kld:
        log("KLD on the trained tiny model")
        enc = encoder.load()
        figures["kld"] = kld(enc, read_texts(args.text), args.train_steps)

    for shape in shapes:
        s = figures.get(f"speed_{shape}")
        if s:
            b = s["bound"]
            print(f"\n== {shape}: bound (numpy f32 matrix-vector chain, same run) {b['tokens_per_s']:.1f} tok/s "
                  f"({b['gb_per_s']:.1f} GB/s over {b['weight_bytes'] / 1e6:.0f} MB)")
            if "bound_1thread" in s:
                print(f"   the same chain with one OpenBLAS thread: {s['bound_1thread']['tokens_per_s']:.1f} tok/s")
            print(f"{'engine':<14} {'rows':>4} {'tok/s':>8} {'x bound':>8} {'paired':>7}")
            for name, r in s["decode"].items():
                eng, rows = name.rsplit(" b", 1)
                print(f"{eng:<14} {rows:>4} {r['tokens_per_s']:8.1f} {r['x_bound']:8.2f} {r['paired_ratio']:7.2f}")
        q = figures.get(f"quantize_{shape}")
        if q:
            for fmt, r in q.items():
                print(f"quantize {shape} {fmt}: {r['quantize_s']:.2f} s (arrays), first decoder {r['first_decoder_s']:.2f} s "
                      f"(quantize + write cache + session), from the cache {r['cached_decoder_s']:.2f} s; "
                      f"cache file {r['cache_bytes'] / 1e6:.0f} MB")
    for shape in shapes:
        r = figures.get(f"rss_{shape}")
        if r:
            tf, f32 = r["tensorflow itself"], r["numpy f32"]
            print(f"\npeak RSS, {shape}, gpt2-generate.py decoding 64 tokens: " +
                  ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in r.items()))
            for fmt in FORMATS:
                if f"onnx {fmt}" in r:
                    q = r[f"onnx {fmt}"]
                    print(f"  {fmt}: {(q - tf) / 1e6:+.0f} MB over TensorFlow itself (bar for q8 small: +250), "
                          f"{q / f32:.2f} x the float32 run (bar for q4 medium: 0.45)")
    if "kld" in figures:
        k = figures["kld"]
        if "training" in k:
            t = k["training"]
            print(f"\nKLD: tiny model trained {t['steps']} steps in {t['seconds']:.0f} s "
                  f"(loss {t['first_loss']:.2f} -> {t['last_loss']:.2f})")
        for fmt in FORMATS:
            if fmt in k:
                r = k[fmt]
                print(f"{fmt}: mean KLD {r['mean_kld']:.5f} (max {r['max_kld']:.4f}), top-1 agreement "
                      f"{100 * r['top1_agreement']:.2f}% over {r['positions']} held-out positions; perplexity "
                      f"{r['ppl']:.2f} vs fp32 {r['ppl_ref']:.2f}; bars (KLD <= {BARS[fmt][0]}, top-1 >= "
                      f"{BARS[fmt][1]:.0%}) {'met' if r['meets_bars'] else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
