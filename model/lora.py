"""LoRA adapters (Hu et al. 2021) for the blocks' weight matrices: train, save, load, merge.

    from model import lora
    ad = lora.attach(m, rank=8, alpha=16)         # m's block matrices W become W + (alpha/rank) A B
    ad.variables                                  # {"model/h0/attn/c_attn/lora_A": tf.Variable [in, r], ...}
    lora.save_adapter(ad, "run", step=100)        # run/adapter-100.npz + the state file run/adapter
    saved = lora.read_adapter("run")              # a run directory or an .npz -> SavedAdapter
    saved.check_base(prefix)                      # ModelError: the adapter was made for another base
    ad = lora.attach(m, saved=saved)              # the saved adapter, trainable again (resume)
    m = model.load(base_dir, lora="run")          # the adapter merged into the float32 weights

A target matrix W [in, out] gets A [in, r] (random, uniform in +-1/sqrt(in))
and B [r, out] (zeros), so that an adapter at step 0 changes nothing: the
block computes ``x W + scale * dropout(x) A B`` with ``scale = alpha / rank``
(dropout only while training).  Only A and B train; the base weights stay
frozen.  The adapter file is an ``.npz`` holding the A and B arrays and, as
``lora.json``, the settings (rank, alpha, targets, dropout) and the identity of
the base checkpoint: ``base_key``, a sha256 over the checkpoint's ``.index``
file (which records every tensor's CRC32C, so it keys the weights' contents
without reading them, and survives copying the directory) and its hparams.

The model's block computes its products through ``gpt2._matmul``, which hands
a weight that has a ``weight_product`` method (``LoraWeight``, ``CastWeight``)
the product to compute.  ``compute_context`` swaps such weights into a
model's blocks only while a training or loss function is traced, so that
the model itself is left as it was (``attach`` keeps them in for good: an
attached model's ``logits`` are those of base + adapter).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from util.files import atomic_write

from .errors import ModelError
from .hparams import HParams

#: The block matrices an adapter may target (checkpoint names below ``model/hI/``).
TARGETS = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
#: Short spellings accepted by ``parse_targets``.
_ALIASES = {"c_attn": ("attn/c_attn",), "attn": ("attn/c_attn", "attn/c_proj"), "c_fc": ("mlp/c_fc",),
            "mlp": ("mlp/c_fc", "mlp/c_proj"), "all": TARGETS}
FORMAT = "gpt2ja-lora"
VERSION = 1
META = "lora.json"
STATE_FILE = "adapter"  # in a run directory: names the newest adapter-N.npz
_FILE_RE = re.compile(r"^adapter-(\d+)\.npz$")


def parse_targets(text: str) -> Tuple[str, ...]:
    """'attn/c_attn,mlp/c_fc' (or c_attn, attn, mlp, c_fc, all) -> the targets, in TARGETS order."""
    chosen = set()
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if part in TARGETS:
            chosen.add(part)
        elif part in _ALIASES:
            chosen.update(_ALIASES[part])
        else:
            raise ModelError(f"unknown LoRA target {part!r} (choose from {', '.join(TARGETS)}, "
                             f"or attn, mlp, c_attn, c_fc, all)")
    if not chosen:
        raise ModelError("no LoRA targets given")
    return tuple(t for t in TARGETS if t in chosen)


def base_key(prefix: str | os.PathLike, hparams: HParams) -> str:
    """The identity of a base checkpoint: sha256 over its ``.index`` bytes (names, shapes and each
    tensor's CRC32C) and its hparams.  Reads no weights; unchanged by copying or moving the files."""
    h = hashlib.sha256()
    try:
        with open(str(prefix) + ".index", "rb") as f:
            h.update(f.read())
    except OSError as e:
        raise ModelError(f"cannot read checkpoint {prefix}: {e.strerror or e}") from None
    h.update(b"\0" + json.dumps(_hparams_dict(hparams), sort_keys=True).encode())
    return h.hexdigest()


def _shape(hp: HParams, target: str) -> Tuple[int, int]:
    e = hp.n_embd
    return {"attn/c_attn": (e, 3 * e), "attn/c_proj": (e, e), "mlp/c_fc": (e, 4 * e), "mlp/c_proj": (4 * e, e)}[target]


def _names(hp: HParams, targets: Iterable[str]) -> List[str]:
    return [f"model/h{i}/{t}/w" for i in range(hp.n_layer) for t in targets]


# --------------------------------------------------------------------------- saved adapters

@dataclass
class SavedAdapter:
    """An adapter as stored: settings, base identity, and the A/B arrays by weight name."""

    rank: int
    alpha: float
    targets: Tuple[str, ...]
    dropout: float
    base_key: str
    hparams: dict
    step: int = 0
    base_path: str = ""
    path: str = ""
    a: Dict[str, np.ndarray] = field(default_factory=dict)  # "model/h0/attn/c_attn/w" -> [in, r]
    b: Dict[str, np.ndarray] = field(default_factory=dict)  # -> [r, out]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check_base(self, prefix: str | os.PathLike, hparams: HParams) -> None:
        """ModelError (one line) unless this adapter was made for the checkpoint ``prefix``."""
        if base_key(prefix, hparams) != self.base_key:
            made = f" ({self.base_path})" if self.base_path else ""
            raise ModelError(f"the adapter {self.path} was made for another base model{made}, not {prefix}; "
                             f"load it with the model it was trained on")

    def deltas(self) -> Dict[str, np.ndarray]:
        """What merging adds to each target matrix [in, out]: scale * A B (float32)."""
        return {n: (self.scale * (self.a[n].astype(np.float64) @ self.b[n].astype(np.float64))).astype(np.float32)
                for n in self.a}


def find_adapter(path: str | os.PathLike) -> Path:
    """The adapter file of ``path``: an .npz itself, or in a directory the file its ``adapter``
    state file names (else the adapter-N.npz with the largest N)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ModelError(f"no adapter at {p}: no such file or directory")
    state = p / STATE_FILE
    if state.is_file():
        try:
            name = state.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ModelError(f"cannot read {state}: {e.strerror or e}") from None
        if not (p / name).is_file():
            raise ModelError(f"{state} names {name!r} but {p / name} does not exist")
        return p / name
    found = sorted((int(m.group(1)), f) for f in os.listdir(p) for m in [_FILE_RE.match(f)] if m)
    if not found:
        raise ModelError(f"no adapter in {p} (expected an {STATE_FILE} state file or adapter-N.npz; "
                         f"made by gpt2-finetune.py --lora RANK)")
    return p / found[-1][1]


def read_adapter(path: str | os.PathLike) -> SavedAdapter:
    """Read an adapter file (or the current one of a run directory); ModelError when it is not one."""
    f = find_adapter(path)
    try:
        with np.load(f, allow_pickle=False) as npz:
            if META not in npz.files:
                raise ModelError(f"{f} is not a LoRA adapter (no {META} in it)")
            meta = json.loads(str(npz[META]))
            arrays = {k: npz[k] for k in npz.files if k != META}
    except ModelError:
        raise
    except Exception as e:  # not a zip, truncated, bad JSON ...
        raise ModelError(f"cannot read the adapter {f}: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ModelError(f"{f} is not a {FORMAT} version {VERSION} adapter")
    try:
        saved = SavedAdapter(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=tuple(meta["targets"]),
                             dropout=float(meta["dropout"]), base_key=str(meta["base_key"]),
                             hparams=dict(meta["hparams"]), step=int(meta.get("step", 0)),
                             base_path=str(meta.get("base_path", "")), path=str(f))
        hp = HParams(**saved.hparams)
        for n in _names(hp, saved.targets):
            saved.a[n], saved.b[n] = arrays[n[:-2] + "/lora_A"], arrays[n[:-2] + "/lora_B"]
            i, o = _shape(hp, n.split("/", 2)[2][:-2])
            if saved.a[n].shape != (i, saved.rank) or saved.b[n].shape != (saved.rank, o):
                raise ModelError(f"{f}: {n[:-2]} has adapter shapes {list(saved.a[n].shape)} and "
                                 f"{list(saved.b[n].shape)}, expected [{i}, {saved.rank}] and [{saved.rank}, {o}]")
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{f}: incomplete LoRA adapter ({e})") from None
    return saved


def save_adapter(adapter: "Adapter", directory: str | os.PathLike, step: int) -> str:
    """Write ``directory/adapter-{step}.npz`` (atomically), then the ``adapter`` state file naming it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = f"adapter-{step}.npz"
    arrays = {}
    for n in adapter.names:
        arrays[n[:-2] + "/lora_A"] = adapter.a[n].numpy()
        arrays[n[:-2] + "/lora_B"] = adapter.b[n].numpy()
    arrays[META] = np.array(json.dumps(adapter.meta(step)))
    atomic_write(d / name, lambda f: np.savez(f, **arrays))
    atomic_write(d / STATE_FILE, lambda f: f.write(name + "\n"), mode="w")
    return str(d / name)


# --------------------------------------------------------------------------- live adapters

class LoraWeight:
    """A block matrix W with its adapter.  While training: ``x W + scale * dropout(x) A B``
    (the factored form: the gradients of A and B never make a full [in, out] matrix).  Otherwise:
    ``x (W + scale * A B)``, the product the merged weights give; with B zero (a new adapter)
    that is W itself, so the model's numbers are exactly the base model's."""

    def __init__(self, base, a, b, adapter: "Adapter"):
        self.base, self.a, self.b, self.adapter = base, a, b, adapter

    def weight_product(self, x):
        from .gpt2 import _matmul, tf
        ad = self.adapter
        if not ad.training:
            delta = tf.matmul(self.a, self.b) * ad.scale
            base = self.base
            if isinstance(base, CastWeight):
                return _matmul(x, CastWeight(base.base + delta))
            if base.dtype == tf.float32:
                return _matmul(x, base + delta)
            return _matmul(x, tf.cast(tf.cast(base, tf.float32) + delta, base.dtype))
        y = _matmul(x, self.base)
        h = tf.nn.dropout(x, rate=ad.dropout) if ad.dropout > 0 else x
        return y + tf.matmul(tf.matmul(h, self.a), self.b) * ad.scale


class CastWeight:
    """A float32 block matrix multiplied in bfloat16 (float32 accumulation, float32 result); the
    gradient reaches the float32 variable through the cast (mixed-precision training)."""

    def __init__(self, base):
        self.base = base

    def weight_product(self, x):
        from .gpt2 import tf
        bf = tf.bfloat16
        return tf.cast(tf.matmul(tf.cast(x, bf), tf.cast(self.base, bf)), tf.float32)


class Adapter:
    """Trainable A/B variables attached to a model's block matrices (made by ``attach``)."""

    def __init__(self, model, rank: int, alpha: float, targets, dropout: float, a, b, base_path: str = ""):
        self.model = model
        self.rank, self.alpha, self.targets, self.dropout = int(rank), float(alpha), tuple(targets), float(dropout)
        self.scale = self.alpha / self.rank
        self.a, self.b = a, b
        self.names = list(a)
        self.training = False
        self.base_path = base_path

    @property
    def variables(self) -> Dict[str, object]:
        """What trains: ``.../lora_A`` and ``.../lora_B`` by name."""
        out = {}
        for n in self.names:
            out[n[:-2] + "/lora_A"] = self.a[n]
            out[n[:-2] + "/lora_B"] = self.b[n]
        return out

    @property
    def n_params(self) -> int:
        return int(sum(int(np.prod(v.shape)) for v in self.variables.values()))

    def meta(self, step: int = 0) -> dict:
        m = self.model
        if not m.path:
            raise ModelError("an adapter needs a base model loaded from a checkpoint (model.load)")
        return {"format": FORMAT, "version": VERSION, "rank": self.rank, "alpha": self.alpha,
                "targets": list(self.targets), "dropout": self.dropout, "step": int(step),
                "base_key": base_key(m.path, m.hparams), "base_path": self.base_path or str(m.path),
                "hparams": _hparams_dict(m.hparams)}

    @contextlib.contextmanager
    def train_mode(self):
        """Dropout on while a training graph is traced."""
        before, self.training = self.training, True
        try:
            yield
        finally:
            self.training = before


def _hparams_dict(hp: HParams) -> dict:
    return {k: getattr(hp, k) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}


def _reset_compiled(m) -> None:
    """Forget a model's traced functions (they captured the block weights as they were)."""
    import functools
    from .gpt2 import tf
    m._forward_fns = {}
    m._prefill_fn = tf.function(m._prefill_graph, reduce_retracing=True)
    m._decode_fns = {long: tf.function(functools.partial(m._decode_graph, long_span=long), reduce_retracing=True)
                     for long in (False, True)}
    m._traced = set()


def attach(m, rank: int = 8, alpha: Optional[float] = None, targets=TARGETS, dropout: float = 0.0,
           seed: int = 0, saved: Optional[SavedAdapter] = None) -> Adapter:
    """Give model ``m`` (loaded from a checkpoint) a trainable adapter; returns it.

    New: A uniform in +-1/sqrt(in) (seeded), B zeros, so ``m.logits`` are unchanged.
    ``saved``: that adapter's settings and arrays instead (resuming; it must fit ``m``,
    see ``SavedAdapter.check_base``).  The model's blocks then compute base + adapter."""
    from .gpt2 import tf
    hp = m.hparams
    if saved is not None:
        if m.path:
            saved.check_base(m.path, hp)
        rank, alpha, targets, dropout = saved.rank, saved.alpha, saved.targets, saved.dropout
    if isinstance(rank, bool) or int(rank) < 1:
        raise ModelError(f"the LoRA rank must be at least 1, got {rank!r}")
    rank = int(rank)
    alpha = float(rank if alpha is None else alpha)
    if not 0.0 <= float(dropout) < 1.0:
        raise ModelError(f"the LoRA dropout must be at least 0 and below 1, got {dropout}")
    targets = parse_targets(",".join(targets)) if not isinstance(targets, str) else parse_targets(targets)
    if any(hasattr(p[t + "/w"], "weight_product") for p in m._layers for t in targets):
        raise ModelError("this model already has an adapter")
    a, b = {}, {}
    rng = np.random.default_rng(seed)
    with tf.device(m.device):
        for n in _names(hp, targets):
            i, o = _shape(hp, n.split("/", 2)[2][:-2])
            if saved is not None:
                av, bv = saved.a[n], saved.b[n]
            else:
                av = rng.uniform(-1.0, 1.0, (i, rank)).astype(np.float32) / np.float32(math.sqrt(i))
                bv = np.zeros((rank, o), np.float32)
            a[n] = tf.Variable(av, dtype=tf.float32, name=n.replace("/", "_")[:-2] + "_lora_A")
            b[n] = tf.Variable(bv, dtype=tf.float32, name=n.replace("/", "_")[:-2] + "_lora_B")
    ad = Adapter(m, rank, alpha, targets, dropout, a, b,
                 base_path=saved.base_path if saved is not None else str(m.path or ""))
    for i, p in enumerate(m._layers):
        for t in targets:
            n = f"model/h{i}/{t}/w"
            p[t + "/w"] = LoraWeight(p[t + "/w"], a[n], b[n], ad)
    _reset_compiled(m)
    m.adapter = ad
    return ad


@contextlib.contextmanager
def compute_context(m, precision: str = "fp32", adapter: Optional[Adapter] = None):
    """While a function is traced: the model's float32 block matrices multiplied in bfloat16
    (``precision='bf16'``: ``CastWeight``), and the adapter's dropout on (``adapter``)."""
    saved_layers = m._layers
    if precision == "bf16":
        layers = []
        for p in m._layers:
            q = dict(p)
            for t in TARGETS:
                w = q[t + "/w"]
                if isinstance(w, LoraWeight):
                    if w.base.dtype.name == "float32":
                        q[t + "/w"] = LoraWeight(CastWeight(w.base), w.a, w.b, w.adapter)
                elif not hasattr(w, "weight_product") and w.dtype.name == "float32":
                    q[t + "/w"] = CastWeight(w)
            layers.append(q)
        m._layers = layers
    try:
        if adapter is not None:
            with adapter.train_mode():
                yield
        else:
            yield
    finally:
        m._layers = saved_layers


def merge_deltas(model_dir_prefix: str, hp: HParams, lora_path) -> Dict[str, np.ndarray]:
    """The deltas of the adapter at ``lora_path`` for the checkpoint ``prefix`` (checked to be its base)."""
    saved = read_adapter(lora_path)
    if _hparams_dict(hp) != {k: saved.hparams.get(k) for k in _hparams_dict(hp)}:
        raise ModelError(f"the adapter {saved.path} was made for a model of another shape "
                         f"({saved.base_path or 'unknown base'}), not {model_dir_prefix}")
    saved.check_base(model_dir_prefix, hp)
    return saved.deltas()
