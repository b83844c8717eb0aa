"""python -m model: the model cache -- download, list, remove, quantize, export, merge.

    python -m model download gpt2ja-medium [gpt2ja-small ...]
    python -m model list
    python -m model remove gpt2ja-medium
    python -m model quantize gpt2ja-small q4     # or a model directory; q8 or q4
    python -m model export gpt2ja-small OUT --format hf   # a Hugging Face transformers folder
    python -m model merge gpt2ja-small checkpoint/run merged/   # a LoRA adapter into a full checkpoint

download: each model is downloaded (resuming a partial download), extracted,
checked to be a loadable checkpoint and moved into the cache ($GPT2JA_HOME,
default $XDG_CACHE_HOME/gpt2-japanese or ~/.cache/gpt2-japanese) -- the same
as the tools do on first use -- so that afterwards the tools run with
GPT2JA_OFFLINE=1 (the vocabulary ships with the encoder package).  The
directory of each model is printed on stdout, one per line, whether it was
downloaded now or found in the cache.  list: one line per cached model,
``name<TAB>size<TAB>path`` (an unfinished download says so).  remove: deletes
a model (and any unfinished download of it) from the cache.  quantize: makes
the 8-bit (q8) or 4-bit (q4) weights that ``--quantize`` decodes with, ahead of
time (otherwise they are made on first use), and prints the cache file
(beside the checkpoint, ``DIR/quantized/``, when that directory is writable,
else under ``$GPT2JA_HOME/quantized``); a valid cache file is reused.
export: writes a model (a directory or a released name) as a Hugging Face
transformers folder (``model.export.export_hf``; docs/export.md) and prints it.
merge: writes BASE with a LoRA adapter (gpt2-finetune.py --lora) merged into its
weights as a checkpoint in the released layout, and prints its prefix.
"""
from __future__ import annotations

import argparse
import os

import hub

from . import flags
from .errors import ArgumentParser, UsageError

_NAMES = ", ".join(hub.RELEASED_MODELS)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m model", description="The cache of released gpt2ja models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{download,list,remove,quantize,export,merge}")
    d = sub.add_parser(
        "download", help="fetch released models into the cache",
        description="Download released models into the cache, with resume, checks and safe extraction; "
                    "print each directory. Addresses: $GPT2JA_MODEL_URLS.",
        epilog="example: python -m model download gpt2ja-medium")
    d.add_argument("names", nargs="+", metavar="NAME", help="released model: " + _NAMES)
    flags.add(d, "progress")
    sub.add_parser("list", help="the cached models: name, size, path",
                   description="One line per cached model: name<TAB>size<TAB>path.")
    r = sub.add_parser("remove", help="delete a model from the cache",
                       description="Delete a released model (and any unfinished download of it) from the cache.")
    r.add_argument("names", nargs="+", metavar="NAME", help="released model: " + _NAMES)
    q = sub.add_parser(
        "quantize", help="make the 8-/4-bit weights of a model ahead of time",
        description="Quantize a model's weights for --quantize (ONNX Runtime MatMulNBits, blocks of 32) and "
                    "cache them beside the checkpoint (or under $GPT2JA_HOME/quantized when its directory is "
                    "not writable); print the cache file. A valid cache file is reused.",
        epilog="example: python -m model quantize gpt2ja-small q4")
    q.add_argument("model", metavar="MODEL", help="model directory, or a released name: " + _NAMES)
    q.add_argument("format", choices=("q8", "q4"), help="q8: 8-bit weights; q4: 4-bit weights")
    flags.add(q, "no_download", "verbose")
    e = sub.add_parser(
        "export", help="write a model as a Hugging Face transformers folder",
        description="Export a model for other libraries. --format hf: a transformers folder (GPT2LMHeadModel "
                    "config.json, model.safetensors, generation_config.json, the tokenizer as code with the "
                    "vocabulary, a model card) that AutoModelForCausalLM.from_pretrained(OUT) and "
                    "AutoTokenizer.from_pretrained(OUT, trust_remote_code=True) load. Needs neither torch nor "
                    "transformers. Prints OUT.",
        epilog="example: python -m model export gpt2ja-small gpt2ja-small-hf --format hf")
    e.add_argument("model", metavar="MODEL", help="model directory (a released or fine-tuned checkpoint), "
                                                  "or a released name: " + _NAMES)
    e.add_argument("out", metavar="OUT", help="output folder (created; files in it are replaced)")
    e.add_argument("--format", type=_export_format, default="hf", metavar="hf",
                   help="hf: a Hugging Face transformers folder (the one format; default)")
    flags.add(e, "vocab", "no_download", "verbose", "progress")
    g = sub.add_parser(
        "merge", help="merge a LoRA adapter into its base model: a full checkpoint",
        description="Write BASE with the LoRA ADAPTER (gpt2-finetune.py --lora: its run directory or an "
                    "adapter-N.npz) merged into its weights, as a checkpoint in the released layout in OUT "
                    "(model-N.index/.data, checkpoint, hparams.json; N is the adapter's step) that every tool "
                    "loads with --model OUT; print its prefix.",
        epilog="example: python -m model merge gpt2ja-small checkpoint/novels models/novels")
    g.add_argument("base", metavar="BASE", help="the base model: a directory or a released name: " + _NAMES)
    g.add_argument("adapter", metavar="ADAPTER", help="the adapter: a run directory or an adapter-N.npz")
    g.add_argument("out", metavar="OUT", help="the directory to write")
    flags.add(g, "no_download", "verbose")
    return p


def _export_format(text: str) -> str:
    if text != "hf":
        raise argparse.ArgumentTypeError(f"unknown format {text!r}: the one format is hf (transformers; "
                                          "docs/export.md says why there is no GGUF)")
    return text


def _merge(args) -> int:
    from . import common

    common.quiet_tensorflow(args.verbose)
    model_dir = hub.resolve_model(args.base, download=not args.no_download)
    import model
    from model import lora

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"cannot write into {args.out}: it is not a directory")
    saved = lora.read_adapter(args.adapter)
    m = model.load(str(model_dir), lora=args.adapter)
    print(model.save(m, args.out, step=saved.step), flush=True)
    return 0


def _export(args) -> int:
    import sys

    from . import common

    common.quiet_tensorflow(args.verbose)
    import encoder

    vocab_dir = encoder.find_vocab(args.vocab)
    model_dir = hub.resolve_model(args.model, download=not args.no_download)
    from model import export

    show = args.progress or args.verbose or sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show and (done == total or done % 8 == 0):
            sys.stderr.write(f"exporting weights: {done}/{total} tensors\n")
            sys.stderr.flush()

    name = args.model if hub.is_released(args.model) and not os.path.isdir(args.model) else None
    files = export.export_hf(model_dir, args.out, vocab_dir, name=name, progress=progress)
    common.log(args, f"wrote {len(files)} files to {args.out}")
    print(args.out, flush=True)
    return 0


def _quantize(args) -> int:
    from . import common

    common.quiet_tensorflow(args.verbose)
    model_dir = hub.resolve_model(args.model, download=not args.no_download)
    import model
    from model import quantize

    # A valid cache file is found without TensorFlow (load_quantized reads it directly); only
    # quantizing the checkpoint the first time loads the float32 model.
    m = model.load_quantized(str(model_dir), args.format)
    q = m.quantized
    if q.path is None:
        key = quantize.checkpoint_key(m.path, args.format)
        places = " or ".join(str(p.parent) for p in quantize.cache_candidates(m.path, args.format, key))
        raise model.ModelError(f"cannot write the quantized weights to {places}")
    common.log(args, f"{args.format} weights {'made' if q.made else 'already cached'}")
    print(q.path, flush=True)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "quantize":
        return _quantize(args)
    if args.command == "export":
        return _export(args)
    if args.command == "merge":
        return _merge(args)
    for name in getattr(args, "names", ()):
        if not hub.is_released(name):
            raise UsageError(f"unknown model {name!r}; released models: {_NAMES}")
    if args.command == "list":
        entries = hub.cached_models()
        if not entries:
            import sys

            sys.stderr.write(f"python -m model: no models in the cache ({hub.cache_dir()}); "
                             f"python -m model download NAME fetches one\n")
        for entry in entries:
            size = _size(entry["size"]) if entry["size"] else "-"
            if entry["partial"]:
                size += f" (+{_size(entry['partial'])} unfinished download)"
            print(f"{entry['name']}\t{size}\t{entry['path']}", flush=True)
        return 0
    if args.command == "remove":
        for name in dict.fromkeys(args.names):
            for path in hub.remove_model(name):
                print(f"removed {path}", flush=True)
        return 0
    progress = True if args.progress else None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the check reads the checkpoint with TensorFlow
    for name in dict.fromkeys(args.names):
        print(hub.download_model(name, progress=progress), flush=True)
    return 0
