#!/usr/bin/env python3
"""Make the answer of docs/sweep.md ("An answer on the tiny model") again, from the repository alone.

    python bench/make_sweep_answer.py [--work DIR] [--out docs/sweep] [--steps 300]

About 1.5 minutes on 2 idle cores (AMD EPYC, 2026-12-07: fine-tuning 40 s; the sweep of 12 settings x
42 contexts x 4 samples, every sample read for PMI, cosine and MAUVE, 25 s; a greedy sweep with
``--set min_length=16`` 12 s; loading TensorFlow three times the rest).  Steps, all logged on stderr:

1. Fine-tune tests/data/gpt2ja-tiny for --steps steps with ``tasks.train.Trainer`` (Adam, learning rate
   5e-3, batches of 8 chunks of 64 tokens from ``tasks.dataset.Chunks`` / ``Sampler`` seed 0) on 9 of
   every 10 non-empty texts of tests/data/golden/encode.jsonl; every 10th (indices 0, 10, 20, ... of the
   non-empty texts: 325) is kept out as the human reference, one text a line (a text's own line breaks
   become spaces).  The model is saved with ``model.save`` (the project's checkpoint writer, as
   gpt2-finetune.py's runs) to WORK/tiny-ft, a directory ``--model`` loads.
2. The 42 contexts: the 14 lines of tests/data/golden/contexts.txt alone, then each line followed by the
   next 3 lines, then each followed by the next 11, joined with nothing between them.  "The next lines"
   wrap around to the top of the file: that is the reading that gives the distribution the section
   states (1 to 203 tokens; 5 contexts of 1-15 tokens, 17 of 16-63, 6 of 64-127, 14 of 128+).  Without
   the wrap the last lines would have fewer followers (1 to 187 tokens; 5 / 24 / 8 / 5).  The script
   checks the distribution and stops if it differs.
3. ``gpt2-sweep.py`` in a subprocess with the section's command: grids top_k=1,5,10,20,40,80,
   top_p=0.8,0.9,0.95 and temperature=0.7,1.0,1.5, --num_generate 4 --max_tokens 48 --seed 1
   --buckets 16,64,128, plus --relation_samples all (PMI, cosine and MAUVE of every sample), into
   WORK/sweep; then ``--grid top_k=1 --set min_length=16`` (the same flags) into WORK/sweep-min_length
   for the section's paragraph on ``min_length``.
4. Copy results.csv and the plots the section shows into --out: axis-top_k.png, axis-top_p.png,
   axis-temperature.png, heatmap-top_k-pmi.png/.svg, heatmap-top_p-pmi.png/.svg, plane.png/.svg.

With --work DIR the work is kept: a run again reuses a trained model there and resumes a sweep there
(``--resume``).  The model cache (``GPT2JA_HOME``) is WORK/home unless set.  stdout: the table of the
section (all contexts) and the greedy figures with and without min_length; logs on stderr.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")

TINY = os.path.join(REPO, "tests", "data", "gpt2ja-tiny")
GOLDEN = os.path.join(REPO, "tests", "data", "golden")
FOLLOWERS = (0, 3, 11)                      # each line alone, then with the next 3, then the next 11
EXPECTED_BUCKETS = {"1-15": 5, "16-63": 17, "64-127": 6, "128+": 14}
GRIDS = ("top_k=1,5,10,20,40,80", "top_p=0.8,0.9,0.95", "temperature=0.7,1.0,1.5")
FLAGS = ("--num_generate", "4", "--max_tokens", "48", "--seed", "1", "--buckets", "16,64,128",
         "--relation_samples", "all")
COPIED = ("results.csv", "plots/axis-top_k.png", "plots/axis-top_p.png", "plots/axis-temperature.png",
          "plots/heatmap-top_k-pmi.png", "plots/heatmap-top_k-pmi.svg", "plots/heatmap-top_p-pmi.png",
          "plots/heatmap-top_p-pmi.svg", "plots/plane.png", "plots/plane.svg")
TABLE = (("rep2", "rep-2", "{:.2f}"), ("diversity", "diversity", "{:.2f}"), ("self_bleu", "Self-BLEU", "{:.1f}"),
         ("perplexity", "perplexity", None), ("pmi", "PMI", "{:.2f}"), ("cosine", "cosine", "{:.2f}"),
         ("length", "length", "{:.1f}"), ("early_end", "early end", "{:.2f}"), ("mauve", "MAUVE", "{:.2f}"))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def split_texts():
    """(train, reference): the non-empty texts of the encoder goldens, every 10th kept as the reference."""
    with open(os.path.join(GOLDEN, "encode.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    texts = [t for t in texts if t.strip()]
    train = [t for i, t in enumerate(texts) if i % 10]
    reference = [" ".join(t.splitlines()) for i, t in enumerate(texts) if i % 10 == 0]
    return train, reference


def make_contexts():
    with open(os.path.join(GOLDEN, "contexts.txt"), encoding="utf-8") as f:
        lines = [x for x in f.read().splitlines() if x]
    return ["".join(lines[(i + j) % len(lines)] for j in range(k + 1)) for k in FOLLOWERS for i in range(len(lines))]


def check_lengths(enc, contexts, n_ctx):
    from tasks.generate import context_ids
    from tasks.sweep.run import bucket_of

    lengths = [len(context_ids(enc, c, n_ctx)) for c in contexts]
    counts = {}
    for n in lengths:
        b = bucket_of(n, (16, 64, 128))
        counts[b] = counts.get(b, 0) + 1
    log(f"{len(contexts)} contexts, {min(lengths)} to {max(lengths)} tokens: "
        + ", ".join(f"{counts.get(b, 0)} of {b}" for b in EXPECTED_BUCKETS))
    if counts != EXPECTED_BUCKETS:
        sys.exit(f"make_sweep_answer.py: the contexts' lengths {counts} are not the section's {EXPECTED_BUCKETS}")


def fine_tune(enc, texts, out_dir, steps):
    """The tiny checkpoint trained for ``steps`` steps on ``texts``, saved to ``out_dir``; its losses."""
    import numpy as np

    import model
    from tasks.dataset import Chunks, Sampler
    from tasks.train import Trainer

    m = model.load(TINY)
    arrays = [np.asarray(enc.encode(t) + [enc.eos_id], np.int32) for t in texts]
    chunks = Chunks.from_arrays(arrays, 64, enc.eos_id)
    trainer = Trainer(m, optim="adam", learning_rate=5e-3)
    sampler = Sampler(len(chunks), seed=0)
    log(f"fine-tuning {TINY} for {steps} steps on {len(texts)} texts ({len(chunks)} chunks of 64 tokens)")
    losses = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        ids, lengths = chunks.batch(sampler.next(8))
        losses.append(trainer.train_step(ids, lengths))
        if step % 50 == 0 or step == steps:
            log(f"  step {step}: loss {np.mean(losses[-10:]):.2f} ({time.perf_counter() - t0:.0f} s)")
    model.save(m, out_dir, step=steps)
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    log(f"saved {out_dir}: loss {first:.1f} -> {last:.1f} (means of the first and last 10 steps)")
    return first, last


def sweep(model_dir, contexts, reference, out, extra, env):
    args = [sys.executable, os.path.join(REPO, "gpt2-sweep.py"), "--model", model_dir, "--contexts", contexts,
            "--reference", reference, "--output", out, *FLAGS, *extra]
    if os.path.exists(os.path.join(out, "run.json")):
        args.append("--resume")
    log("$ " + " ".join(args[1:]))
    t0 = time.perf_counter()
    p = subprocess.run(args, cwd=REPO, env=env, stdout=sys.stderr)
    if p.returncode:
        sys.exit(f"make_sweep_answer.py: gpt2-sweep.py exited with {p.returncode}")
    log(f"sweep done in {time.perf_counter() - t0:.0f} s")


def all_rows(results_csv):
    with open(results_csv, encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["bucket"] == "all"]


def cell(row, key, fmt):
    v = row.get(key)
    if v in (None, ""):
        return "–"
    v = float(v)
    if fmt is None:  # perplexity: from about 4 to tens of thousands
        fmt = "{:.1f}" if v < 100 else "{:,.0f}"
    return fmt.format(v).replace("-", "−")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", metavar="DIR", help="work directory, kept (default: a temporary one, removed)")
    p.add_argument("--out", metavar="DIR", default=os.path.join(REPO, "docs", "sweep"),
                   help="where results.csv and the plots go (default docs/sweep)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    args = p.parse_args()

    t_start = time.perf_counter()
    tmp = None
    if args.work is None:
        tmp = tempfile.mkdtemp(prefix="sweep-answer-")
        work = tmp
    else:
        work = os.path.abspath(args.work)
        os.makedirs(work, exist_ok=True)
    try:
        env = dict(os.environ)
        env.setdefault("GPT2JA_HOME", os.path.join(work, "home"))
        os.environ["GPT2JA_HOME"] = env["GPT2JA_HOME"]

        import encoder

        enc = encoder.load(os.environ.get("GPT2JA_VOCAB") or os.path.join(REPO, "encoder"))
        train, reference = split_texts()
        contexts = make_contexts()
        check_lengths(enc, contexts, 1024)
        contexts_file = os.path.join(work, "contexts.txt")
        reference_file = os.path.join(work, "human.txt")
        with open(contexts_file, "w", encoding="utf-8") as f:
            f.write("\n".join(contexts) + "\n")
        with open(reference_file, "w", encoding="utf-8") as f:
            f.write("\n".join(reference) + "\n")
        log(f"{len(train)} training texts, {len(reference)} reference texts")

        model_dir = os.path.join(work, "tiny-ft")
        if os.path.exists(os.path.join(model_dir, f"model-{args.steps}.index")):
            log(f"reusing the fine-tuned model in {model_dir}")
            losses = None
        else:
            losses = fine_tune(enc, train, model_dir, args.steps)

        grids = [x for g in GRIDS for x in ("--grid", g)]
        sweep(model_dir, contexts_file, reference_file, os.path.join(work, "sweep"), grids, env)
        sweep(model_dir, contexts_file, reference_file, os.path.join(work, "sweep-min_length"),
              ["--grid", "top_k=1", "--set", "min_length=16"], env)

        os.makedirs(args.out, exist_ok=True)
        for rel in COPIED:
            shutil.copyfile(os.path.join(work, "sweep", rel), os.path.join(args.out, os.path.basename(rel)))
        log(f"copied {len(COPIED)} files to {args.out}")

        rows = all_rows(os.path.join(work, "sweep", "results.csv"))
        print("| setting | " + " | ".join(h for _, h, _ in TABLE) + " |")
        print("| --- " * (len(TABLE) + 1) + "|")
        for r in rows:
            name = "reference (human)" if r["setting"] == "reference" else r["setting"]
            print(f"| {name} | " + " | ".join(cell(r, k, fmt) for k, _, fmt in TABLE) + " |")
        greedy = next(r for r in rows if r["setting"] == "top_k=1")
        rewound = next(r for r in all_rows(os.path.join(work, "sweep-min_length", "results.csv"))
                       if r["setting"] == "top_k=1")
        print(f"greedy perplexity {float(greedy['perplexity']):.1f} -> {float(rewound['perplexity']):.0f} "
              f"and PMI {float(greedy['pmi']):.2f} -> {float(rewound['pmi']):.2f} with min_length=16")
        if losses:
            print(f"fine-tuning loss {losses[0]:.1f} -> {losses[1]:.1f}")
        print(f"{(time.perf_counter() - t_start) / 60:.1f} minutes")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
