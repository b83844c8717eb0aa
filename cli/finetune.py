"""gpt2-finetune.py: fine-tune a gpt2ja model on your own text (the original's run_finetune.py, and more)."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

from . import common, flags, io
from .errors import ArgumentParser, Terminated, UsageError


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-finetune.py",
        description="Fine-tune a Japanese GPT-2 model on your own text. Checkpoints go to "
                    "CHECKPOINT_DIR/RUN_NAME in the released layout (load them with --model "
                    "checkpoint/RUN_NAME in every tool); rerunning the same command resumes there. "
                    "Ctrl-C (or SIGTERM) saves and exits.",
        epilog="Example: python gpt2-encode.py --src_dir novels/ --dst_file novels.npz && "
               "python gpt2-finetune.py --base_model gpt2ja-small --dataset novels.npz --run_name novels --max_steps 5000")
    p.add_argument("--base_model", "--model", dest="model", default="gpt2ja-small",
                   help="the model to start from: a model directory or a released name (default %(default)s, "
                        "as the original)")
    flags.add(p, "vocab", "gpu", "threads", "verbose", "no_download")
    p.add_argument("--dataset", metavar="PATH", required=True,
                   help="an .npz written by gpt2-encode.py (or the original encode_bpe.py), "
                        "or a directory of .txt files / one .txt file (encoded on the fly)")
    p.add_argument("--run_name", default="gpt2ja_finetune",
                   help="run id: the checkpoint subdirectory (default %(default)s)")
    p.add_argument("--checkpoint_dir", default="checkpoint", help="where runs go (default %(default)s)")
    flags.add(p, "batch_size", batch_size={"default": 1, "help": "chunks per micro-batch (default 1)"})
    p.add_argument("--accumulate", metavar="N", type=flags.positive_int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation): the effective batch is "
                        "batch_size x N chunks, with the memory of one micro-batch (default 1)")
    p.add_argument("--optim", choices=("adam", "adagrad", "sgd"), default="adam",
                   help="optimizer (default adam: beta1 0.9, beta2 0.98, epsilon 1e-7)")
    p.add_argument("--learning_rate", metavar="LR", type=flags.positive_float, default=None,
                   help="learning rate (default 5e-5, as the original; 2e-4 with --lora)")
    p.add_argument("--warmup_steps", metavar="WR", type=flags.non_negative_int, default=0,
                   help="linear learning-rate warm-up steps (default 0)")
    p.add_argument("--save_every", metavar="N", type=flags.positive_int, default=1000,
                   help="write a checkpoint every N steps (default 1000)")
    p.add_argument("--keep", metavar="N", type=flags.positive_int, default=5,
                   help="checkpoints kept in the run directory, newest first (default 5, as the original); "
                        "only the newest keeps its optimizer state")
    p.add_argument("--max_steps", type=flags.positive_int, default=None,
                   help="stop after this many steps in all (counting resumed ones); default: run until Ctrl-C")
    p.add_argument("--epochs", type=flags.positive_float, default=None,
                   help="stop after this many passes over the training chunks (counting resumed steps)")
    p.add_argument("--val_fraction", type=flags.number, default=0.0,
                   help="hold out this fraction of the chunks and print their loss every --eval_every steps")
    p.add_argument("--eval_every", metavar="N", type=flags.positive_int, default=100,
                   help="steps between validation losses (default 100)")
    flags.add(p, "seed", "clean_text", "num_process", "progress",
              seed={"help": "seed of the chunk order and validation split (default: random, remembered in the run)"},
              clean_text={"help": "with a directory of .txt files: clean the text as gpt2-encode.py --clean_text"})
    p.add_argument("--chunk", type=flags.positive_int, default=None,
                   help="tokens per chunk (default: the model's n_ctx, 1024)")
    p.add_argument("--lora", dest="lora_rank", metavar="RANK", type=flags.positive_int, default=None,
                   help="train a LoRA adapter of this rank instead of every weight; only the adapter is saved "
                        "(CHECKPOINT_DIR/RUN_NAME/adapter-N.npz, a few MB): use it with --model BASE "
                        "--lora CHECKPOINT_DIR/RUN_NAME in every tool, or merge it (python -m model merge)")
    p.add_argument("--lora_alpha", metavar="ALPHA", type=flags.positive_float, default=None,
                   help="the adapter's scale is alpha/rank (default alpha = 2 x rank)")
    p.add_argument("--lora_targets", metavar="LIST", default="attn/c_attn,attn/c_proj,mlp/c_fc,mlp/c_proj",
                   help="block matrices that get an adapter, comma-separated (attn/c_attn, attn/c_proj, mlp/c_fc, "
                        "mlp/c_proj; or attn, mlp, all); default: all four in every block")
    p.add_argument("--lora_dropout", metavar="P", type=flags.number, default=0.0,
                   help="dropout on the adapter's input while training (default 0)")
    flags.add(p, "precision", precision={
        "help": "training's matrix products: fp32 (default) or bf16 (bfloat16 products with float32 "
                "weights, gradients and optimizer state; on CPUs without AMX or AVX512_BF16 fp32 is used, "
                "with a warning). With --lora the frozen base matrices are held in bfloat16"})
    p.add_argument("--strategy", choices=("mirrored", "multiworker"), default=None,
                   help="mirrored: every GPU of this machine (else the CPU); multiworker: the machines of "
                        "TF_CONFIG (run the same command on each, with its own TF_CONFIG task). --batch_size is "
                        "the global batch, split across the replicas; the chief writes the checkpoints; "
                        "default: one device")
    p.add_argument("--worker_timeout", metavar="S", type=flags.positive_float, default=120.0,
                   help="with multiworker: seconds a step waits for a lost worker before the run ends with "
                        "one line, the last checkpoint kept (default 120)")
    return p


def _load_dataset(args, enc):
    from tasks import dataset as D

    path = args.dataset
    if os.path.isdir(path) or (path.endswith(".txt") and os.path.isfile(path)):
        bar = lambda it, total: io.progress(it, total=total, desc="encoding", unit="file",  # noqa: E731
                                            force=args.progress)
        return D.encode_files(D.find_texts(path), enc, clean=args.clean_text,
                              processes=args.num_process or min(8, os.cpu_count() or 1), progress=bar)
    if not os.path.exists(path):
        raise UsageError(f"no such dataset: {path}")
    return D.load_npz(path)


def _shape(hp) -> str:
    return f"n_layer={hp.n_layer} n_embd={hp.n_embd} n_head={hp.n_head} n_ctx={hp.n_ctx} n_vocab={hp.n_vocab}"


def _load_model(args, enc, run_dir, resume):
    """The run's latest checkpoint when resuming (it must have the base model's shape), else the base model
    (with --lora: always the base model, in bfloat16 with --precision bf16)."""
    import hub
    from model import ModelError
    from model.checkpoint import open_checkpoint

    base_args = argparse.Namespace(**{**vars(args), "lora": None,
                                      "precision": args.precision if args.lora_rank else "fp32"})
    if resume is None or args.lora_rank:
        try:
            return common.load_model(base_args, enc)
        except ModelError as e:
            raise UsageError(f"cannot load the base model {args.model}: {e}") from None
    base = hub.model_path(args.model)
    run_hp = open_checkpoint(run_dir)[1]
    if base.is_dir():
        base_hp = open_checkpoint(base)[1]
        if base_hp != run_hp:
            raise UsageError(f"{run_dir} holds a model of another shape ({_shape(run_hp)}) than "
                             f"--base_model {args.model} ({_shape(base_hp)}); use another --run_name")
    return common.load_model(argparse.Namespace(**{**vars(base_args), "model": run_dir}), enc)


def _adapter(args, m, run_dir, resume, seed):
    """The LoRA adapter to train: the run's latest (resuming; it must be made for this base) or a new one."""
    from model import ModelError, lora

    try:
        if resume is not None:
            saved = lora.read_adapter(run_dir)
            if (saved.rank, tuple(saved.targets)) != (args.lora_rank, lora.parse_targets(args.lora_targets)):
                common.warn(f"{run_dir} holds a rank-{saved.rank} adapter of {','.join(saved.targets)}: "
                            "resuming with its settings")
            return lora.attach(m, saved=saved)
        alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
        return lora.attach(m, rank=args.lora_rank, alpha=alpha, targets=args.lora_targets,
                           dropout=args.lora_dropout, seed=seed)
    except ModelError as e:
        raise UsageError(str(e)) from None


class _Printer:
    """tasks.train.Events for a terminal: a progress bar on stderr, losses on stdout."""

    def __init__(self, bar):
        self.bar = bar

    def step(self, step, loss, average, tokens_per_s):
        self.bar.set_postfix(loss=f"{loss:.3f}", avg=f"{average:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        self.bar.update(1)

    def _print(self, line):
        if self.bar.disable:
            print(line, flush=True)
        else:  # through the bar, so that the two never share a line
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def report(self, step, loss, average):
        self._print(f"step {step}: loss {loss:.4f} avg {average:.4f}")

    def validated(self, step, val_loss):
        self._print(f"step {step}: val_loss {val_loss:.4f}")

    def saved(self, step, prefix):
        self.bar.write(f"saved {prefix}", file=sys.stderr)

    def interrupted(self, step):
        self.bar.write("interrupted", file=sys.stderr)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    common.quiet_tensorflow(args.verbose)  # before anything imports TensorFlow (tasks.train, model.lora)
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f"--val_fraction must be at least 0 and below 1, got {args.val_fraction}")
    run_dir = os.path.join(args.checkpoint_dir, args.run_name)
    for path in (args.checkpoint_dir, run_dir):
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"cannot write checkpoints into {path}: it is not a directory")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError(f"--lora_dropout must be at least 0 and below 1, got {args.lora_dropout}")
    if args.lora_rank:
        from model import ModelError, lora
        try:
            lora.parse_targets(args.lora_targets)
        except ModelError as e:
            raise UsageError(f"--lora_targets: {e}") from None
    if args.learning_rate is None:
        args.learning_rate = 2e-4 if args.lora_rank else 5e-5
    from tasks import train as T
    from model import ModelError

    if os.path.isdir(run_dir) and T.latest_step(run_dir) is not None:
        if T.is_adapter_run(run_dir) and not args.lora_rank:
            raise UsageError(f"{run_dir} holds a LoRA adapter run: resume it with --lora RANK, "
                             "or use another --run_name")
        if args.lora_rank and not T.is_adapter_run(run_dir):
            raise UsageError(f"{run_dir} holds a full fine-tuning run, not a LoRA adapter: use another --run_name")
    try:
        strategy = T.make_strategy(args.strategy, timeout_s=args.worker_timeout)
    except ModelError as e:
        raise UsageError(str(e)) from None
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        try:
            return _train(args, run_dir, strategy)
        except T.cluster_errors() as e:
            if strategy is None:
                raise
            raise UsageError(f"the cluster failed before training ({T._first_line(e)}): is every worker in "
                             f"TF_CONFIG running and reachable?") from None


def _train(args, run_dir, strategy) -> int:
    from tasks import dataset as D
    from tasks import train as T

    if args.precision == "bf16":
        import model
        flags.settle_precision(args, model.select_device(str(args.gpu)), "trains")
    enc = common.load_encoder(args)
    arrays = _load_dataset(args, enc)
    resume = T.latest_step(run_dir)
    m = _load_model(args, enc, run_dir, resume)
    hp = m.hparams
    chunk = args.chunk or hp.n_ctx
    if chunk > hp.n_ctx:
        raise UsageError(f"--chunk {chunk} is longer than the model's context ({hp.n_ctx} tokens)")
    D.check_ids(arrays, hp.n_vocab)
    T.check_memory(hp, args.batch_size, chunk, lora=bool(args.lora_rank))
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if args.batch_size % replicas:
        raise UsageError(f"--batch_size {args.batch_size} does not split among {replicas} replicas: "
                         f"give a multiple of {replicas} (the global batch)")

    settings = T.read_settings(run_dir) if resume is not None else {}
    seed = args.seed if args.seed is not None else settings.get("seed")
    if seed is None and args.strategy == "multiworker":
        raise UsageError("--strategy multiworker needs --seed (every worker draws the same batches)")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    train, val = D.Chunks.from_arrays(arrays, chunk, enc.eos_id).split(args.val_fraction, seed)
    del arrays
    max_steps = args.max_steps
    if args.epochs is not None:
        by_epochs = max(1, math.ceil(args.epochs * len(train) / (args.batch_size * args.accumulate)))
        max_steps = by_epochs if max_steps is None else min(max_steps, by_epochs)
    step = resume or 0
    if max_steps is not None and step >= max_steps:
        sys.stderr.write(f"{run_dir} is already at step {step} (--max_steps/--epochs {max_steps})\n")
        return 0

    adapter = _adapter(args, m, run_dir, resume, seed) if args.lora_rank else None
    trainer = T.Trainer(m, optim=args.optim, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                        accumulate=args.accumulate, adapter=adapter, precision=args.precision, strategy=strategy)
    if resume is not None:
        if not T.restore_optimizer(trainer, run_dir, step):
            common.warn(f"no optimizer state for step {step} in {run_dir} (or another --optim): "
                        "the optimizer starts afresh")
        trainer.step.assign(step)
        sys.stderr.write(f"resuming {run_dir} at step {step}\n")
    chief = T.is_chief(strategy)  # only the chief writes into the run directory
    if chief:
        os.makedirs(run_dir, exist_ok=True)
        lora_settings = {} if adapter is None else {"lora": {"rank": adapter.rank, "alpha": adapter.alpha,
                                                             "targets": list(adapter.targets),
                                                             "dropout": adapter.dropout}}
        T.write_settings(run_dir, {"seed": seed, "base_model": str(args.model), "chunk": chunk, "optim": args.optim,
                                   "learning_rate": args.learning_rate, "batch_size": args.batch_size,
                                   "accumulate": args.accumulate, "precision": args.precision, **lora_settings})
    sys.stderr.write(f"{len(train)} training chunks ({train.n_tokens()} tokens)"
                     + (f", {len(val)} validation chunks" if val is not None else "") + "\n")
    if strategy is not None:
        sys.stderr.write(f"{args.strategy}: {strategy.num_replicas_in_sync} replicas, each "
                         f"{args.batch_size // strategy.num_replicas_in_sync} of the {args.batch_size} chunks "
                         f"of a micro-batch{'' if chief else '; the chief writes the checkpoints'}\n")
    if adapter is not None:
        sys.stderr.write(f"LoRA rank {adapter.rank}, alpha {adapter.alpha:g} on {','.join(adapter.targets)}: "
                         f"{adapter.n_params} trained parameters "
                         f"({100.0 * adapter.n_params / hp.n_params:.2f}% of {hp.n_params})\n")

    sys.stderr.write("tracing the training step…\n")
    sys.stderr.flush()
    t0 = time.perf_counter()
    trainer.trace()
    common.log(args, f"traced in {time.perf_counter() - t0:.1f} s")
    schedule = T.Schedule(batch_size=args.batch_size, max_steps=max_steps, save_every=args.save_every,
                          eval_every=args.eval_every, keep=args.keep)
    bar = io.progress(total=max_steps, desc="training", unit="step", force=args.progress)
    bar.update(step)
    try:
        T.fine_tune(trainer, train, val, run_dir, schedule, seed, step=step, saved=resume is not None,
                    events=_Printer(bar), interrupts=(KeyboardInterrupt, Terminated))
    finally:
        bar.close()
    return 0
