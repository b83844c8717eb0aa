"""Exporting a checkpoint for other libraries: ``python -m model export DIR OUT --format hf``.

    from model import export
    export.export_hf("gpt2ja-tiny-dir", "out", vocab_dir="encoder")   # -> list of files written

The ``hf`` format is a Hugging Face transformers model folder::

    config.json               GPT2LMHeadModel of the checkpoint's shape (gelu_new, eps 1e-5, tied output)
    model.safetensors         every weight under transformers' names, float32
    generation_config.json    the original's sampling defaults (do_sample, top_k 40)
    tokenization_gpt2ja.py    the tokenizer (this package's hf_tokenizer.py), with
    tokenizer_config.json     its auto_map, and the vocabulary files
    ja-bpe.txt, emoji.json,   of the released models and their licence
    LICENSE-vocabulary
    special_tokens_map.json
    README.md                 the model card

so that ``AutoModelForCausalLM.from_pretrained(OUT)`` and
``AutoTokenizer.from_pretrained(OUT, trust_remote_code=True)`` load the pair.
Neither torch nor transformers is imported here: safetensors is a JSON header
and raw little-endian arrays, written with numpy.  The weights are read one
variable at a time from the checkpoint (TensorFlow's reader), so memory holds
one matrix at a time.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from util.files import atomic_file

from .errors import ModelError
from .hparams import LAYER_NAMES, LAYER_NORM_EPSILON, HParams

FORMATS = ("hf",)
TOKENIZER_MODULE = "tokenization_gpt2ja"
TOKENIZER_CLASS = "GPT2JapaneseTokenizer"
VOCAB_FILES = ("ja-bpe.txt", "emoji.json")
EOS = "<|endoftext|>"
WEIGHTS_FILE = "model.safetensors"

# checkpoint name inside model/hN/ -> transformers' name inside transformer.h.N.
_LAYER_MAP = {
    "ln_1/g": "ln_1.weight", "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight", "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight", "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight", "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight", "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight", "mlp/c_proj/b": "mlp.c_proj.bias",
}
assert set(_LAYER_MAP) == set(LAYER_NAMES)


def hf_names(hp: HParams) -> Dict[str, str]:
    """Checkpoint name -> transformers' GPT2LMHeadModel name, in checkpoint order.

    The output projection is tied to ``transformer.wte.weight`` (no ``lm_head.weight``).
    GPT-2's Conv1D keeps its weights as [in, out], as the checkpoint does: no transpose;
    the checkpoint's leading 1 of ``[1, in, out]`` is dropped.
    """
    names = {"model/wte": "transformer.wte.weight", "model/wpe": "transformer.wpe.weight"}
    for i in range(hp.n_layer):
        for ours, theirs in _LAYER_MAP.items():
            names[f"model/h{i}/{ours}"] = f"transformer.h.{i}.{theirs}"
    names["model/ln_f/g"] = "transformer.ln_f.weight"
    names["model/ln_f/b"] = "transformer.ln_f.bias"
    return names


def hf_config(hp: HParams, eos_id: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": hp.n_vocab,
        "n_positions": hp.n_ctx,
        "n_embd": hp.n_embd,
        "n_layer": hp.n_layer,
        "n_head": hp.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation the checkpoints were trained with
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def generation_config(hp: HParams, eos_id: int) -> dict:
    """The original gpt2-generate.py's defaults: sampling, top_k 40, temperature 1."""
    return {
        "do_sample": True,
        "top_k": 40,
        "temperature": 1.0,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": TOKENIZER_CLASS,
        "auto_map": {"AutoTokenizer": [f"{TOKENIZER_MODULE}.{TOKENIZER_CLASS}", None]},
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "clean": False,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
    }


def safetensors_header(tensors: List[Tuple[str, Tuple[int, ...]]], metadata: Dict[str, str]) -> bytes:
    """The header of a float32 safetensors file holding ``tensors`` (name, shape) in this order:
    8 bytes little-endian length, then JSON padded with spaces to a multiple of 8."""
    header: Dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape in tensors:
        size = 4
        for d in shape:
            size *= int(d)
        header[name] = {"dtype": "F32", "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path, tensors: List[Tuple[str, Tuple[int, ...]]], read: Callable[[str], object],
                      metadata: Optional[Dict[str, str]] = None, progress: Optional[Callable] = None) -> None:
    """Write ``tensors`` to ``path`` atomically, reading each array with ``read(name)`` just before
    writing it (so memory holds one at a time)."""
    import numpy as np

    with atomic_file(path, "wb") as f:
        f.write(safetensors_header(tensors, metadata or {"format": "pt"}))
        for i, (name, shape) in enumerate(tensors):
            array = np.ascontiguousarray(np.asarray(read(name), dtype="<f4").reshape(shape))
            f.write(memoryview(array).cast("B"))
            if progress is not None:
                progress(i + 1, len(tensors))


def read_safetensors(path) -> Dict[str, object]:
    """Every tensor of a float32 safetensors file as numpy arrays (the project's tests, without torch)."""
    import numpy as np

    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ModelError(f"{path}: {name} is {info['dtype']}, not F32")
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + begin:8 + n + end], dtype="<f4").reshape(info["shape"])
    return out


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as src, atomic_file(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def model_card(hp: HParams, source: str, name: str) -> str:
    params = hp.n_params() if callable(getattr(hp, "n_params", None)) else getattr(hp, "n_params", None)
    shape = (f"{hp.n_layer} layers, width {hp.n_embd}, {hp.n_head} heads, context {hp.n_ctx} tokens, "
             f"vocabulary {hp.n_vocab}" + (f", {params / 1e6:.0f} M parameters" if params else ""))
    return f"""---
language: ja
library_name: transformers
pipeline_tag: text-generation
tags:
- gpt2
- japanese
---

# {name} (Japanese GPT-2, exported for transformers)

A GPT-2 language model for Japanese: {shape}.

- **Source**: the TensorFlow checkpoint `{source}` of the gpt2-japanese tools
  (the released gpt2ja-small / gpt2ja-medium / gpt2ja-large by tanreinama, or a model fine-tuned
  from one of them).
- **Exported** with `python -m model export {source} OUT --format hf` of this project's
  gpt2-japanese tools: every float32 weight as it is in the checkpoint, under transformers'
  `GPT2LMHeadModel` names (`model.safetensors`; the output projection is tied to the token
  embedding), GELU with the tanh approximation (`gelu_new`), layer norm epsilon 1e-5.
  transformers' logits agree with the TensorFlow graph's to within 1e-4 (checked on a test model).
- **Tokenizer**: the Japanese BPE encoder of the original tools (vocabulary `ja-bpe.txt`,
  emoji table `emoji.json` from the Japanese-BPEEncoder project, MIT licence: `LICENSE-vocabulary`),
  as `GPT2JapaneseTokenizer` in `{TOKENIZER_MODULE}.py`. No tokenizer that transformers ships gives
  the same ids, so loading it needs `trust_remote_code=True`. `clean=True` (the original's
  `clean_text`) needs the `jaconv` package.
- **Generation defaults** (`generation_config.json`): sampling with top_k 40, temperature 1, as the
  original `gpt2-generate.py`.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("OUT", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("OUT")
ids = tokenizer("今日は良い天気です。", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=50)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
```

vLLM and TGI load the model as a GPT-2; their tokenizer is this file's, so they need
`trust_remote_code` (vLLM: `--trust-remote-code`; TGI: `--trust-remote-code`).

## Licence

The vocabulary files are under the MIT licence of the Japanese-BPEEncoder project
(`LICENSE-vocabulary`, copyright 2020 tanreinama). The released gpt2ja weights come from the
gpt2-japanese project (https://github.com/tanreinama/gpt2-japanese), whose repository is under
the MIT licence (copyright 2019 tanreinama); its model page (`report/models.md`) states no
separate terms for the weights. Check there before redistributing them.
"""


def export_hf(model_dir, out, vocab_dir, vocab_license: Optional[os.PathLike] = None,
              name: Optional[str] = None, progress: Optional[Callable] = None) -> List[Path]:
    """Write the transformers folder ``out`` for the checkpoint in ``model_dir`` with the
    vocabulary in ``vocab_dir`` (ja-bpe.txt, emoji.json; its LICENSE file when there is one,
    or ``vocab_license``).  Every file is written atomically; ``config.json`` last, so that
    an interrupted export is not a loadable folder.  Returns the files written.
    ModelError for a bad checkpoint, vocabulary or output folder."""
    from .checkpoint import open_checkpoint

    out = Path(out)
    vocab_dir = Path(vocab_dir)
    for f in VOCAB_FILES:
        if not (vocab_dir / f).is_file():
            raise ModelError(f"vocabulary file {vocab_dir / f} does not exist")
    tokens = (vocab_dir / VOCAB_FILES[0]).read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    try:
        eos_id = max(i for i, t in enumerate(tokens) if t == EOS)
    except ValueError:
        raise ModelError(f"{vocab_dir / VOCAB_FILES[0]} has no {EOS} entry") from None
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} exists and is not a directory")
    reader, hp = open_checkpoint(model_dir)
    if len(tokens) != hp.n_vocab:
        raise ModelError(f"the vocabulary in {vocab_dir} has {len(tokens)} entries but the model expects "
                         f"n_vocab={hp.n_vocab}; use the vocabulary the model was trained with")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create {out}: {e.strerror or e}") from None

    names = hf_names(hp)
    tensors = []
    for ckpt_name, hf_name in names.items():
        shape = reader.shapes[ckpt_name]
        tensors.append((hf_name, tuple(shape[1:]) if len(shape) == 3 else tuple(shape)))
    by_hf = {v: k for k, v in names.items()}
    written = []
    write_safetensors(out / WEIGHTS_FILE, tensors, lambda n: reader.get(by_hf[n]), progress=progress)
    written.append(out / WEIGHTS_FILE)

    for f in VOCAB_FILES:
        _copy(vocab_dir / f, out / f)
        written.append(out / f)
    lic = vocab_dir / "LICENSE"
    lic = lic if lic.is_file() else (Path(vocab_license) if vocab_license else None)
    if lic is not None and lic.is_file():
        _copy(lic, out / "LICENSE-vocabulary")
        written.append(out / "LICENSE-vocabulary")
    _copy(Path(__file__).with_name("hf_tokenizer.py"), out / f"{TOKENIZER_MODULE}.py")
    written.append(out / f"{TOKENIZER_MODULE}.py")
    _write_json(out / "tokenizer_config.json", tokenizer_config())
    _write_json(out / "special_tokens_map.json", {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS})
    _write_json(out / "generation_config.json", generation_config(hp, eos_id))
    # the card names the model, not a local path (it may be published)
    name = name or Path(os.path.abspath(model_dir)).name
    _write_text(out / "README.md", model_card(hp, name, name))
    written += [out / "tokenizer_config.json", out / "special_tokens_map.json", out / "generation_config.json",
                out / "README.md"]
    _write_json(out / "config.json", hf_config(hp, eos_id))
    written.append(out / "config.json")
    return written
