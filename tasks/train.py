"""Fine-tuning: loss, optimizers with the original's TF1 semantics, training step, checkpoints.

    import model, tasks.train as T
    m = model.load("gpt2ja-small")
    tr = T.Trainer(m, optim="adam", learning_rate=5e-5, batch_size=1, accumulate=1)
    loss = tr.train_step(ids, lengths)      # ids [B*accumulate, T] int32, lengths [B*accumulate]
    T.save_run(tr, "checkpoint/run1", step=100)
    step = T.restore_run(tr, "checkpoint/run1")   # weights + optimizer state, returns the step

The loss is the mean cross-entropy of next-token prediction over the real
tokens of each chunk (positions past a chunk's length are masked out), which
for full chunks is exactly the original's ``reduce_mean`` over ``[B, T-1]``.

Optimizers are written here with the update rules of the TF1 optimizers the
original uses (AdamOptimizer beta1 0.9, beta2 0.98, epsilon 1e-7 with its
bias-corrected step size; AdagradOptimizer with initial accumulator 0.1;
GradientDescentOptimizer), so that their state is plain named arrays saved
next to each checkpoint (``optimizer-N.npz``) and a resumed run continues with
the same moments.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from model import ModelError, import_tf
from util.files import atomic_write

from .dataset import Sampler
from . import memory

tf = import_tf()

OPTIMIZERS = ("adam", "adagrad", "sgd")
_BATCH_SPEC = (tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32))
KEEP = 5  # checkpoints kept in a run directory, as the original's max_to_keep
COUNTER_FILE = "counter"
_CKPT_RE = re.compile(r"^(?:model-(\d+)\.index|adapter-(\d+)\.npz)$")


def learning_rate_at(step, base: float, warmup_steps: int):
    """Linear warm-up from 1e-10 to ``base`` over ``warmup_steps`` (TF1 polynomial_decay, power 1), then ``base``."""
    if warmup_steps <= 0:
        return tf.constant(base, tf.float32)
    frac = tf.minimum(tf.cast(step, tf.float32), float(warmup_steps)) / float(warmup_steps)
    return (1e-10 - base) * (1.0 - frac) + base


class Trainer:
    """A training loop's state: the model's variables, optimizer slots, compiled steps."""

    def __init__(self, model, optim: str = "adam", learning_rate: float = 5e-5, warmup_steps: int = 0,
                 accumulate: int = 1, adapter=None, precision: str = "fp32", strategy=None):
        """``adapter`` (``model.lora.attach``): train its A/B matrices only, the model's weights
        frozen, and save the adapter alone.  ``precision='bf16'``: the blocks' matrix products in
        bfloat16 (float32 accumulation) while the weights, gradients and optimizer state stay
        float32 (a bfloat16 model's frozen matrices, under an adapter, are used as they are).
        ``strategy``: a ``tf.distribute`` strategy whose scope the model (and adapter) were made
        in, and this Trainer is made in (``distributed``): each step's batch is split across its
        replicas; the batch's rows (batch_size x accumulate) must divide among them."""
        if optim not in OPTIMIZERS:
            raise ModelError(f"unknown optimizer {optim!r} (choose from {', '.join(OPTIMIZERS)})")
        if precision not in ("fp32", "bf16"):
            raise ModelError(f"precision must be fp32 or bf16, got {precision!r}")
        if adapter is None and model.precision != "fp32":
            raise ModelError(f"full fine-tuning needs float32 weights, not {model.precision}: load the model "
                             f"as fp32 and train with precision='bf16'")
        self.model = model
        self.adapter = adapter
        self.precision = precision
        self.optim = optim
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.accumulate = int(accumulate)
        self.strategy = strategy
        trained = model.variables if adapter is None else adapter.variables
        self.names = sorted(trained)
        self.vars = [trained[n] for n in self.names]
        with tf.device(model.device):
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.slots: Dict[str, tf.Variable] = {}
            for n, v in zip(self.names, self.vars):
                if optim == "adam":
                    self.slots[f"{n}/Adam"] = tf.Variable(tf.zeros_like(v), trainable=False)
                    self.slots[f"{n}/Adam_1"] = tf.Variable(tf.zeros_like(v), trainable=False)
                elif optim == "adagrad":
                    self.slots[f"{n}/Adagrad"] = tf.Variable(tf.fill(v.shape, 0.1), trainable=False)
        # one trace each, for every batch size and chunk length
        self._step_fn = tf.function(self._traced(self._train_graph, training=True), input_signature=_BATCH_SPEC)
        self._loss_fn = tf.function(self._traced(self._loss_graph, training=False), input_signature=_BATCH_SPEC)

    def _traced(self, graph, training: bool):
        """``graph`` traced with the blocks computing in ``precision`` (and the adapter's dropout on
        while training); the model itself is left as it was."""
        from model import lora

        def fn(*args):
            with lora.compute_context(self.model, self.precision, self.adapter if training else None):
                return graph(*args)

        fn.__name__ = graph.__name__
        return fn

    def trace(self) -> None:
        """Trace the training step now (the first ``train_step`` does it otherwise)."""
        with tf.device(self.model.device):
            self._step_fn.get_concrete_function()

    # ------------------------------------------------------------------ graphs

    def _loss_graph(self, ids, lengths):
        """Mean next-token cross-entropy over real tokens; (sum of losses, token count)."""
        logits = self.model.graph_logits(self.model.graph_hidden(ids))
        labels = ids[:, 1:]
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits[:, :-1])
        positions = tf.range(tf.shape(ids)[1] - 1)[None, :]
        mask = tf.cast(positions < (lengths[:, None] - 1), tf.float32)
        return tf.reduce_sum(ce * mask), tf.reduce_sum(mask)

    def _apply(self, grads):
        t = self.step + 1
        lr = learning_rate_at(self.step, self.learning_rate, self.warmup_steps)
        if self.optim == "adam":
            b1, b2, eps = 0.9, 0.98, 1e-7
            tf_ = tf.cast(t, tf.float32)
            lr_t = lr * tf.sqrt(1.0 - tf.pow(b2, tf_)) / (1.0 - tf.pow(b1, tf_))
        for n, v, g in zip(self.names, self.vars, grads):
            if self.optim == "adam":
                m = self.slots[f"{n}/Adam"]
                s = self.slots[f"{n}/Adam_1"]
                m.assign(b1 * m + (1.0 - b1) * g)
                s.assign(b2 * s + (1.0 - b2) * tf.square(g))
                v.assign_sub(lr_t * m / (tf.sqrt(s) + eps))
            elif self.optim == "adagrad":
                a = self.slots[f"{n}/Adagrad"]
                a.assign_add(tf.square(g))
                v.assign_sub(lr * g * tf.math.rsqrt(a))
            else:
                v.assign_sub(lr * g)
        self.step.assign_add(1)

    def _gradients(self, ids, lengths, total_tokens):
        """(sum of token losses, gradients of that sum / total_tokens) over ``accumulate``
        micro-batches stacked along the batch axis of ids."""
        micro = tf.reshape(ids, [self.accumulate, -1, tf.shape(ids)[1]])
        micro_len = tf.reshape(lengths, [self.accumulate, -1])
        acc = [tf.zeros(v.shape, tf.float32) for v in self.vars]
        loss_sum = tf.constant(0.0)
        for i in range(self.accumulate):  # unrolled: accumulate is small
            with tf.GradientTape() as tape:
                s, _ = self._loss_graph(micro[i], micro_len[i])
                scaled = s / total_tokens
            grads = tape.gradient(scaled, self.vars)
            acc = [a + tf.convert_to_tensor(g) for a, g in zip(acc, grads)]
            loss_sum += s
        return loss_sum, acc

    def _train_graph(self, ids, lengths):
        """One optimizer step over ``accumulate`` micro-batches stacked along the batch axis.

        Under a ``strategy`` every replica takes its share of each micro-batch (the rows
        ``replica_id * B/replicas ...`` of it), the gradients (each of the replica's loss over
        the global batch's token count) are summed across replicas, and the one update is
        applied to the (mirrored) variables: the same step as on one device."""
        total_tokens = tf.maximum(tf.reduce_sum(tf.cast(lengths - 1, tf.float32)), 1.0)
        if self.strategy is None:
            loss_sum, grads = self._gradients(ids, lengths, total_tokens)
        else:
            replicas = self.strategy.num_replicas_in_sync
            length = tf.shape(ids)[1]

            def share(ids, lengths):
                r = tf.distribute.get_replica_context().replica_id_in_sync_group
                rows = tf.shape(ids)[0] // (self.accumulate * replicas)
                mine = tf.reshape(ids, [self.accumulate, replicas, rows, length])[:, r]
                mine_len = tf.reshape(lengths, [self.accumulate, replicas, rows])[:, r]
                return self._gradients(tf.reshape(mine, [-1, length]), tf.reshape(mine_len, [-1]), total_tokens)

            def flat_share(ids, lengths):  # one vector: a single all-reduce of every gradient and the loss
                s, grads = share(ids, lengths)
                return tf.concat([tf.reshape(g, [-1]) for g in grads] + [tf.reshape(s, [1])], axis=0)

            total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(flat_share, args=(ids, lengths)),
                                         axis=None)
            sizes = [int(np.prod(v.shape)) for v in self.vars]
            parts = tf.split(total, sizes + [1])
            grads = [tf.reshape(g, v.shape) for g, v in zip(parts[:-1], self.vars)]
            loss_sum = parts[-1][0]
        self._apply(grads)
        return loss_sum / total_tokens

    # ------------------------------------------------------------------ API

    def train_step(self, ids: np.ndarray, lengths: np.ndarray) -> float:
        with tf.device(self.model.device):
            return float(self._step_fn(tf.constant(ids, tf.int32), tf.constant(lengths, tf.int32)))

    def evaluate(self, chunks, batch_size: int = 1) -> float:
        """Mean token loss over every chunk of a ``dataset.Chunks``."""
        total, count = 0.0, 0.0
        for start in range(0, len(chunks), batch_size):
            idx = np.arange(start, min(start + batch_size, len(chunks)))
            ids, lens = chunks.batch(idx)
            with tf.device(self.model.device):
                s, c = self._loss_fn(tf.constant(ids), tf.constant(lens))
            total += float(s)
            count += float(c)
        return total / max(count, 1.0)

    def optimizer_state(self) -> Dict[str, np.ndarray]:
        state = {k: v.numpy() for k, v in self.slots.items()}
        state["global_step"] = np.asarray(self.step.numpy())
        return state

    def load_optimizer_state(self, state) -> bool:
        """Restore slots saved by ``optimizer_state``; False (nothing changed) when they do not fit."""
        if set(state) != set(self.slots) | {"global_step"}:
            return False
        if any(tuple(state[k].shape) != tuple(v.shape) for k, v in self.slots.items()):
            return False
        for k, v in self.slots.items():
            v.assign(state[k])
        self.step.assign(int(state["global_step"]))
        return True


# ---------------------------------------------------------------------- several devices, several machines

STRATEGIES = ("mirrored", "multiworker")


def parse_tf_config(text: Optional[str]) -> dict:
    """TF_CONFIG checked: {"cluster": {"worker": ["host:port", ...], ("chief": [...])}, "task": {"type", "index"}};
    ModelError (one line) saying what is wrong."""
    if not text or not text.strip():
        raise ModelError("--strategy multiworker needs TF_CONFIG, e.g. "
                         '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                         '"task": {"type": "worker", "index": 0}}')
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise ModelError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster = cfg.get("cluster") if isinstance(cfg, dict) else None
    task = cfg.get("task") if isinstance(cfg, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise ModelError('TF_CONFIG has no "cluster" with a "worker" list')
    for kind, hosts in cluster.items():
        if not isinstance(hosts, list) or not all(isinstance(h, str) and re.fullmatch(r"\S+:\d+", h) for h in hosts):
            raise ModelError(f'TF_CONFIG: cluster "{kind}" must be a list of "host:port" strings, got {hosts!r}')
    if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int) \
            or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise ModelError(f'TF_CONFIG: "task" must name this process\'s place in the cluster '
                         f'({{"type": "worker", "index": 0..{len(cluster.get("worker", [])) - 1}}}), got {task!r}')
    return cfg


def make_strategy(kind: Optional[str], timeout_s: float = 60.0):
    """None (one device), or a tf.distribute strategy: 'mirrored' (every GPU of this machine, else
    the CPU) or 'multiworker' (TF_CONFIG's cluster; a collective that waits more than
    ``timeout_s`` for a worker fails).  Make it before TensorFlow runs anything else."""
    if kind is None:
        return None
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind != "multiworker":
        raise ModelError(f"unknown strategy {kind!r} (choose from {', '.join(STRATEGIES)})")
    parse_tf_config(os.environ.get("TF_CONFIG"))
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (tf.errors.OpError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot join the cluster in TF_CONFIG: {_first_line(e)}") from None


def is_chief(strategy) -> bool:
    """Whether this process writes checkpoints: always without a multi-worker strategy; else the
    "chief" task, or worker 0 of a cluster without one."""
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


def _first_line(e: BaseException) -> str:
    text = (getattr(e, "message", None) or str(e) or type(e).__name__).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def cluster_errors():
    """What a lost or unreachable worker raises from a step (TensorFlow's op errors)."""
    return (tf.errors.OpError,)


# ---------------------------------------------------------------------- run directory

def checkpoint_steps(run_dir) -> list:
    """Steps of the model-N checkpoints in ``run_dir`` (ascending)."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    return sorted({int(m.group(1) or m.group(2)) for m in map(_CKPT_RE.match, os.listdir(d)) if m})


def latest_step(run_dir) -> Optional[int]:
    """The step of the checkpoint (or LoRA adapter) the state file names (None when there is none)."""
    from model.checkpoint import find_checkpoint
    from model import lora
    d = Path(run_dir)
    if is_adapter_run(d):
        m = re.search(r"-(\d+)\.npz$", lora.find_adapter(d).name)
        return int(m.group(1)) if m else 0
    if not (d / "checkpoint").is_file():
        return None
    prefix = find_checkpoint(d)
    m = re.search(r"-(\d+)$", prefix)
    return int(m.group(1)) if m else 0


def is_adapter_run(run_dir) -> bool:
    """Whether ``run_dir`` holds a LoRA run (its ``adapter`` state file) rather than full checkpoints."""
    from model import lora
    return (Path(run_dir) / lora.STATE_FILE).is_file()


def save_run(trainer: Trainer, run_dir, step: int, keep: int = KEEP) -> str:
    """Write ``optimizer-N.npz``, then the checkpoint (state file last, via ``model.save``),
    then ``counter`` (with an adapter: ``adapter-N.npz`` and its state file ``adapter``
    instead of the checkpoint); then keep only the newest ``keep`` checkpoints, and the optimizer
    state of the newest alone (resuming needs no other).  A failure at any point (a full
    disk) leaves the previous checkpoint named by the state file intact, removes what
    was written of this one and raises ModelError("cannot save checkpoint ...")."""
    from model.checkpoint import save, write_state_file
    d = Path(run_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        state = trainer.optimizer_state()
        atomic_write(d / f"optimizer-{step}.npz", lambda f: np.savez(f, **state))
        if trainer.adapter is not None:
            from model import lora
            prefix = lora.save_adapter(trainer.adapter, d, step)
        else:
            prefix = save(trainer.model, d, step=step)
        atomic_write(d / COUNTER_FILE, lambda f: f.write(f"{step}\n".encode()))
    except (OSError, ModelError) as e:
        if latest_step(d) != step:
            _remove_step(d, step, optimizer=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).rsplit(": ", 1)[-1]
        raise ModelError(f"cannot save checkpoint {d / f'model-{step}'}: {reason}; the previous checkpoint is kept") \
            from None
    older = [s for s in checkpoint_steps(d) if s != step]
    dropped = older[:max(0, len(older) - (max(keep, 1) - 1))]
    for s in older:
        _remove_step(d, s, optimizer=True, model=s in dropped)
    if dropped and trainer.adapter is None:
        write_state_file(d, f"model-{step}")
    return prefix


def _remove_step(d: Path, step: int, optimizer: bool, model: bool = True) -> None:
    files = [*d.glob(f"model-{step}.*"), d / f"adapter-{step}.npz"] if model else []
    if optimizer:
        files.append(d / f"optimizer-{step}.npz")
    for f in files:
        try:
            f.unlink()
        except OSError:
            pass


def restore_optimizer(trainer: Trainer, run_dir, step: int) -> bool:
    """Optimizer moments saved with checkpoint ``step``; False when missing or not matching."""
    path = Path(run_dir) / f"optimizer-{step}.npz"
    if not path.is_file():
        return False
    try:
        with np.load(path) as npz:
            state = {k: npz[k] for k in npz.files}
    except Exception:
        return False
    return trainer.load_optimizer_state(state)


SETTINGS_FILE = "finetune.json"


def read_settings(run_dir) -> dict:
    """The settings a run directory remembers (its seed, ...); {} when there are none."""
    try:
        with open(Path(run_dir) / SETTINGS_FILE, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_settings(run_dir, settings: dict) -> None:
    atomic_write(Path(run_dir) / SETTINGS_FILE, lambda f: f.write(json.dumps(settings, indent=2)), mode="w")


def memory_needed(hp, batch_size: int, chunk: int, lora: bool = False) -> int:
    """A generous estimate of the bytes one training step takes: weights, gradients and
    two optimizer moments, plus what backpropagation keeps of one micro-batch
    (about 16 values per token and width per layer, the attention weights, and the
    logits with their gradient).  ``lora``: the weights once (frozen; the adapter's
    own state is small)."""
    weights = 4 * hp.n_params
    tokens = batch_size * chunk
    per_layer = 4 * tokens * (16 * hp.n_embd + 2 * hp.n_head * chunk)
    logits = 4 * 3 * tokens * hp.n_vocab
    return (1 if lora else 4) * weights + hp.n_layer * per_layer + logits


def check_memory(hp, batch_size: int, chunk: int, lora: bool = False) -> None:
    """OptionError (batch_size) when a training step would need more memory than is available."""
    memory.check("batch_size", batch_size, memory_needed(hp, batch_size, chunk, lora),
                 "one training step (use --accumulate to keep the effective batch)")


# ---------------------------------------------------------------------- the training loop

class RunningMean:
    """The original's running average of the loss: avg += (loss - avg) / weight, weight = 0.99 * weight + 1."""

    def __init__(self):
        self.value: Optional[float] = None
        self.weight = 0.0

    def add(self, x: float) -> float:
        self.weight = 0.99 * self.weight + 1.0
        self.value = x if self.value is None else self.value + (x - self.value) / self.weight
        return self.value


class Events:
    """What the loop reports; the command-line tool prints it (override what you need)."""

    def step(self, step: int, loss: float, average: float, tokens_per_s: float) -> None:
        pass

    def report(self, step: int, loss: float, average: float) -> None:
        """Every save_every steps and at the end."""

    def validated(self, step: int, val_loss: float) -> None:
        pass

    def saved(self, step: int, prefix: str) -> None:
        pass

    def interrupted(self, step: int) -> None:
        pass


@dataclass
class Schedule:
    """How long and how often: ``max_steps`` None runs until interrupted."""

    batch_size: int = 1
    max_steps: Optional[int] = None
    save_every: int = 1000
    eval_every: int = 100
    keep: int = KEEP


def fine_tune(trainer: Trainer, train, val, run_dir, schedule: Schedule, seed: int, step: int = 0,
              saved: bool = False, events: Events = Events(),
              interrupts: Tuple[type, ...] = (KeyboardInterrupt,)) -> int:
    """Train from ``step`` until ``schedule.max_steps``; returns the last step.

    One loop, top to bottom: draw the next chunks (``Sampler``: a fresh random
    order each epoch, continued exactly on resume), take one optimizer step,
    report, validate every ``eval_every`` steps, save every ``save_every``
    steps and at the end.  An interruption (Ctrl-C, or what ``interrupts``
    names) saves the current step and ends the loop; a second one during the
    save waits for the save to finish.  ``saved``: ``step`` is already on disk
    (a resumed run).
    """
    per_step = schedule.batch_size * trainer.accumulate
    sampler = Sampler(len(train), seed, position=step * per_step)
    on_disk = step if saved else None
    loss, mean = None, RunningMean()

    chief = is_chief(trainer.strategy)

    def save():
        nonlocal on_disk
        if on_disk != step and chief:
            with _interrupts_held():
                events.saved(step, save_run(trainer, run_dir, step, keep=schedule.keep))
            on_disk = step

    try:
        while schedule.max_steps is None or step < schedule.max_steps:
            ids, lengths = train.batch(sampler.next(per_step))
            t0 = time.perf_counter()
            try:
                loss = trainer.train_step(ids, lengths)
            except cluster_errors() as e:
                if trainer.strategy is None:
                    raise
                raise ModelError(f"training stopped at step {step + 1}: a worker was lost or cannot be reached "
                                 f"({_first_line(e)}); the last checkpoint in {run_dir} is kept") from None
            seconds = time.perf_counter() - t0
            step += 1
            if not math.isfinite(loss):
                raise ModelError(f"the loss became {loss} at step {step}; lower the learning rate "
                                 f"(the last checkpoint in {run_dir} is kept)")
            events.step(step, loss, mean.add(loss), int(lengths.sum()) / seconds)
            if val is not None and step % schedule.eval_every == 0:
                events.validated(step, trainer.evaluate(val, schedule.batch_size))
            if step % schedule.save_every == 0:
                events.report(step, loss, mean.value)
                save()
    except interrupts:
        events.interrupted(step)
        save()
        return step
    if loss is not None and step % schedule.save_every:
        events.report(step, loss, mean.value)
    if val is not None and loss is not None and step % schedule.eval_every:
        events.validated(step, trainer.evaluate(val, schedule.batch_size))
    save()
    return step


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C during the block is held back until the block is done (then raised)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda *a: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held and previous is signal.default_int_handler:
        raise KeyboardInterrupt
