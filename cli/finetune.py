"""gpt2-finetune.py: fine-tune a gpt2ja model on your own text (the original's run_finetune.py, and more)."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

from . import common
from .errors import ArgumentParser, UsageError


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-finetune.py",
        description="Fine-tune a Japanese GPT-2 model on your own text. Checkpoints go to "
                    "CHECKPOINT_DIR/RUN_NAME in the released layout (load them with --model "
                    "checkpoint/RUN_NAME in every tool); rerunning the same command resumes there. "
                    "Ctrl-C saves and exits.",
        epilog="Example: python gpt2-encode.py --src_dir novels/ --dst_file novels.npz && "
               "python gpt2-finetune.py --base_model gpt2ja-small --dataset novels.npz --run_name novels --max_steps 5000")
    common.add_model_flags(p)
    p.add_argument("--base_model", dest="model", default=argparse.SUPPRESS,
                   help="the model to start from (same as --model; the original's flag name)")
    p.add_argument("--dataset", metavar="PATH", required=True,
                   help="an .npz written by gpt2-encode.py (or the original encode_bpe.py), "
                        "or a directory of .txt files / one .txt file (encoded on the fly)")
    p.add_argument("--run_name", default="gpt2ja_finetune",
                   help="run id: the checkpoint subdirectory (default %(default)s)")
    p.add_argument("--checkpoint_dir", default="checkpoint", help="where runs go (default %(default)s)")
    p.add_argument("--batch_size", metavar="SIZE", type=common.positive_int, default=1,
                   help="chunks per micro-batch (default 1)")
    p.add_argument("--accumulate", metavar="N", type=common.positive_int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation): the effective batch is "
                        "batch_size x N chunks, with the memory of one micro-batch (default 1)")
    p.add_argument("--optim", choices=("adam", "adagrad", "sgd"), default="adam",
                   help="optimizer (default adam: beta1 0.9, beta2 0.98, epsilon 1e-7)")
    p.add_argument("--learning_rate", metavar="LR", type=_positive_float, default=5e-5,
                   help="learning rate (default 5e-5)")
    p.add_argument("--warmup_steps", metavar="WR", type=common.non_negative_int, default=0,
                   help="linear learning-rate warm-up steps (default 0)")
    p.add_argument("--save_every", metavar="N", type=common.positive_int, default=1000,
                   help="write a checkpoint every N steps (default 1000)")
    p.add_argument("--max_steps", type=common.positive_int, default=None,
                   help="stop after this many steps in all (counting resumed ones); default: run until Ctrl-C")
    p.add_argument("--epochs", type=_positive_float, default=None,
                   help="stop after this many passes over the training chunks (counting resumed steps)")
    p.add_argument("--val_fraction", type=float, default=0.0,
                   help="hold out this fraction of the chunks and print their loss every --eval_every steps")
    p.add_argument("--eval_every", metavar="N", type=common.positive_int, default=100,
                   help="steps between validation losses (default 100)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the chunk order and validation split (default: random, remembered in the run)")
    p.add_argument("--chunk", type=common.positive_int, default=None,
                   help="tokens per chunk (default: the model's n_ctx, 1024)")
    p.add_argument("--clean_text", action="store_true",
                   help="with a directory of .txt files: clean the text as gpt2-encode.py --clean_text")
    p.add_argument("--num_process", type=common.positive_int, default=min(8, os.cpu_count() or 1),
                   help="processes encoding a directory of .txt files")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    return p


def _load_dataset(args, enc):
    from tasks import dataset as D

    path = args.dataset
    if os.path.isfile(path) and path.endswith(".npz"):
        return D.load_npz(path)
    if os.path.isdir(path) or path.endswith(".txt"):
        files = D.find_texts(path)
        bar = lambda it, total: common.progress(it, total=total, desc="encoding", unit="file",  # noqa: E731
                                                force=args.progress)
        return D.encode_files(files, enc, clean=args.clean_text, processes=args.num_process, progress=bar)
    if not os.path.exists(path):
        raise UsageError(f"no such dataset: {path}")
    return D.load_npz(path)


def _base_hparams(args):
    """The base model's hparams without loading its weights (None when not at hand)."""
    import hub
    from model import RELEASED
    from model.checkpoint import open_checkpoint

    if os.path.isdir(args.model):
        return open_checkpoint(args.model)[1]
    if str(args.model) in RELEASED:
        return RELEASED[str(args.model)]
    p = hub.model_path(args.model)
    return open_checkpoint(p)[1] if p.is_dir() else None


def _shape(hp) -> str:
    return (f"n_layer={hp.n_layer} n_embd={hp.n_embd} n_head={hp.n_head} "
            f"n_ctx={hp.n_ctx} n_vocab={hp.n_vocab}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f"--val_fraction must be at least 0 and below 1, got {args.val_fraction}")
    common.quiet_tensorflow(args.verbose)
    from tasks import dataset as D
    from model.errors import ModelError

    enc = common.load_encoder(args)
    try:
        arrays = _load_dataset(args, enc)
    except D.DatasetError as e:
        raise UsageError(str(e)) from None

    run_dir = os.path.join(args.checkpoint_dir, args.run_name)
    import model
    from tasks import train as T

    resume = T.latest_step(run_dir) if os.path.isfile(os.path.join(run_dir, "checkpoint")) else None
    if resume is not None:
        base_hp = _base_hparams(args)
        run_hp = model.open_checkpoint(run_dir)[1]
        if base_hp is not None and run_hp != base_hp:
            raise UsageError(f"{run_dir} holds a model of another shape ({_shape(run_hp)}) than "
                             f"--base_model {args.model} ({_shape(base_hp)}); use another --run_name")
        args_model, args.model = args.model, run_dir
        m = common.load_model(args, enc)
        args.model = args_model
    else:
        try:
            m = common.load_model(args, enc)
        except ModelError as e:
            raise UsageError(f"cannot load the base model {args.model}: {e}") from None
    hp = m.hparams
    chunk = args.chunk or hp.n_ctx
    if chunk > hp.n_ctx:
        raise UsageError(f"--chunk {chunk} is longer than the model's context ({hp.n_ctx} tokens)")
    top = max(int(a.max()) for a in arrays if a.size)
    if top >= hp.n_vocab:
        raise UsageError(f"the dataset has token id {top}, outside the model's vocabulary (0..{hp.n_vocab - 1})")

    settings_path = os.path.join(run_dir, "finetune.json")
    settings = {}
    if resume is not None and os.path.isfile(settings_path):
        try:
            with open(settings_path, encoding="utf-8") as f:
                settings = json.load(f)
        except (OSError, ValueError):
            settings = {}
    seed = args.seed if args.seed is not None else settings.get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    try:
        chunks = D.Chunks.from_arrays(arrays, chunk, enc.eos_id)
        train, val = chunks.split(args.val_fraction, seed)
    except D.DatasetError as e:
        raise UsageError(str(e)) from None
    del arrays

    per_step = args.batch_size * args.accumulate
    max_steps = args.max_steps
    if args.epochs is not None:
        by_epochs = max(1, math.ceil(args.epochs * len(train) / per_step))
        max_steps = by_epochs if max_steps is None else min(max_steps, by_epochs)

    trainer = T.Trainer(m, optim=args.optim, learning_rate=args.learning_rate,
                        warmup_steps=args.warmup_steps, accumulate=args.accumulate)
    step = resume or 0
    if resume is not None:
        if T.restore_optimizer(trainer, run_dir, step):
            trainer.step.assign(step)
        else:
            trainer.step.assign(step)
            common.warn(f"no optimizer state for step {step} in {run_dir} (or another --optim): "
                        "the optimizer starts afresh")
        sys.stderr.write(f"resuming {run_dir} at step {step}\n")
    os.makedirs(run_dir, exist_ok=True)
    T.write_json(settings_path, {"seed": seed, "base_model": str(args.model), "chunk": chunk,
                                 "optim": args.optim, "learning_rate": args.learning_rate,
                                 "batch_size": args.batch_size, "accumulate": args.accumulate})
    sys.stderr.write(f"{len(train)} training chunks ({train.n_tokens()} tokens)"
                     + (f", {len(val)} validation chunks" if val is not None else "") + "\n")

    sampler = D.Sampler(len(train), seed, position=step * per_step)
    saved_at = [step if resume is not None else None]

    def save():
        if saved_at[0] == step:
            return
        # A Ctrl-C during a save is held back until the save is complete (and then acted on).
        held = []
        previous = signal.signal(signal.SIGINT, lambda *a: held.append(True))
        try:
            prefix = T.save_run(trainer, run_dir, step)
        finally:
            signal.signal(signal.SIGINT, previous)
        saved_at[0] = step
        sys.stderr.write(f"saved {prefix}\n")
        if held and previous is signal.default_int_handler:
            raise KeyboardInterrupt

    def validate():
        v = trainer.evaluate(val, args.batch_size)
        print(f"step {step}: val_loss {v:.4f}", flush=True)

    if max_steps is not None and step >= max_steps:
        sys.stderr.write(f"{run_dir} is already at step {step} (--max_steps/--epochs {max_steps})\n")
        return 0
    bar = common.progress(total=max_steps, desc="training", unit="step", force=args.progress)
    bar.update(step)
    avg, weights = None, 0.0
    try:
        while max_steps is None or step < max_steps:
            ids, lens = train.batch(sampler.next(per_step))
            t0 = time.perf_counter()
            loss = trainer.train_step(ids, lens)
            dt = time.perf_counter() - t0
            step += 1
            if not math.isfinite(loss):
                raise UsageError(f"the loss became {loss} at step {step}; lower --learning_rate "
                                 f"(the last checkpoint in {run_dir} is kept)")
            weights = 0.99 * weights + 1.0  # the original's running average
            avg = loss if avg is None else avg + (loss - avg) / weights
            bar.set_postfix(loss=f"{loss:.3f}", avg=f"{avg:.3f}", tok_s=f"{int(lens.sum()) / dt:.0f}", refresh=False)
            bar.update(1)
            if val is not None and step % args.eval_every == 0:
                validate()
            if step % args.save_every == 0:
                print(f"step {step}: loss {loss:.4f} avg {avg:.4f}", flush=True)
                save()
    except KeyboardInterrupt:
        bar.close()
        sys.stderr.write("\ninterrupted\n")
        save()
        return 0
    bar.close()
    if avg is not None and step % args.save_every:
        print(f"step {step}: loss {loss:.4f} avg {avg:.4f}", flush=True)
    if val is not None and step % args.eval_every:
        validate()
    save()
    return 0
