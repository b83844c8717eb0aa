"""Hyperparameters of a GPT-2 model (no TensorFlow import here).

``HParams`` holds the five numbers that fix every weight's shape.  The
helpers below also list the checkpoint variables a model of given hparams
must contain, with their shapes, so that the checkpoint reader can name a
missing or misshaped variable precisely.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Mapping, Tuple

from .errors import ModelError

#: Epsilon of every layer norm (as in the original GPT-2).
LAYER_NORM_EPSILON = 1e-5
#: Width of one attention head in the released models; used to infer n_head.
HEAD_WIDTH = 64
#: Vocabulary size of the released Japanese models.
N_VOCAB_JA = 20573

_FIELDS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


@dataclasses.dataclass(frozen=True)
class HParams:
    """Shape of a GPT-2: vocabulary, context length, width, heads, layers."""

    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int

    def __post_init__(self):
        for name in _FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelError(f"hyperparameter {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ModelError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (n_embd // n_head)."""
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        """Number of parameters (embeddings included, the output projection being tied)."""
        return sum(_prod(shape) for shape in variable_shapes(self).values())

    def to_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "hparams") -> "HParams":
        """Build from a mapping with the five keys (extra keys are ignored)."""
        if not isinstance(data, Mapping):
            raise ModelError(f"{source}: expected a JSON object with {', '.join(_FIELDS)}")
        missing = [name for name in _FIELDS if name not in data]
        if missing:
            raise ModelError(f"{source}: missing {', '.join(missing)}")
        values = {}
        for name in _FIELDS:
            value = data[name]
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelError(f"{source}: {name} must be an integer, got {value!r}")
            values[name] = value
        try:
            return cls(**values)
        except ModelError as e:
            raise ModelError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "HParams":
        """Read an ``hparams.json`` file; any problem raises ModelError naming it."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ModelError(f"cannot read {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data, source=str(path))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


#: Shapes of the released models gpt2ja-small, -medium and -large.
RELEASED: Dict[str, HParams] = {
    "small": HParams(n_vocab=N_VOCAB_JA, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "medium": HParams(n_vocab=N_VOCAB_JA, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),
    "large": HParams(n_vocab=N_VOCAB_JA, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
}


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layer_shapes(n_embd: int) -> Dict[str, Tuple[int, ...]]:
    """Shapes of one block's variables, keyed by their name inside ``model/hN/``."""
    e = n_embd
    return {
        "ln_1/g": (e,),
        "ln_1/b": (e,),
        "attn/c_attn/w": (1, e, 3 * e),
        "attn/c_attn/b": (3 * e,),
        "attn/c_proj/w": (1, e, e),
        "attn/c_proj/b": (e,),
        "ln_2/g": (e,),
        "ln_2/b": (e,),
        "mlp/c_fc/w": (1, e, 4 * e),
        "mlp/c_fc/b": (4 * e,),
        "mlp/c_proj/w": (1, 4 * e, e),
        "mlp/c_proj/b": (e,),
    }


#: Names of one block's variables inside ``model/hN/`` ("ln_1/g", "attn/c_attn/w", ...), in checkpoint order.
LAYER_NAMES: Tuple[str, ...] = tuple(layer_shapes(1))


def layer_weights(weights: Mapping, layer: int) -> Dict[str, object]:
    """Block ``layer``'s entries of a mapping keyed by checkpoint name, keyed by ``LAYER_NAMES``.

    ``layer_weights(m.variables, 0)["attn/c_attn/w"]`` is ``m.variables["model/h0/attn/c_attn/w"]``:
    every engine reads a block's weights by name, never by position.
    """
    return {name: weights[f"model/h{layer}/{name}"] for name in LAYER_NAMES}


def variable_shapes(hp: HParams) -> Dict[str, Tuple[int, ...]]:
    """Every checkpoint variable of a model with hparams ``hp``, in checkpoint order.

    Names are the TF1 name-based ones of the released checkpoints
    (``model/wte``, ``model/h0/attn/c_attn/w``, ..., ``model/ln_f/b``).
    """
    shapes = {
        "model/wte": (hp.n_vocab, hp.n_embd),
        "model/wpe": (hp.n_ctx, hp.n_embd),
    }
    per_layer = layer_shapes(hp.n_embd)
    for i in range(hp.n_layer):
        for name, shape in per_layer.items():
            shapes[f"model/h{i}/{name}"] = shape
    shapes["model/ln_f/g"] = (hp.n_embd,)
    shapes["model/ln_f/b"] = (hp.n_embd,)
    return shapes


def check_vocab(hparams: HParams, n: int) -> None:
    """Raise ModelError unless a vocabulary of ``n`` entries fits the model."""
    if n != hparams.n_vocab:
        raise ModelError(
            f"vocabulary has {n} entries but the model expects n_vocab={hparams.n_vocab}; "
            "use the vocabulary the model was trained with")
