"""Every flag shared by several tools, declared once (llama.cpp's common/arg.cpp is the model).

    p = ArgumentParser(prog="gpt2-transform.py", ...)
    flags.add(p, "model", "vocab", "gpu", "verbose", "no_download", "output_file",
              batch_tokens={"default": 4096})

A tool picks the flags it has by name and may override a declaration's
keywords (a default, a help text); a flag that only one tool has is
declared in that tool's module.  Every flag is accepted with ``_`` and ``-``
spelled either way (``--num_generate`` / ``--num-generate``, ``--no-download``
/ ``--no_download``; see ``errors.ArgumentParser``).  Nothing here imports
TensorFlow.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, Tuple

from model import PRECISIONS  # (the model package without TensorFlow)

DEFAULT_MODEL = "gpt2ja-medium"


def _integer(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = _integer(1, "must be at least 1")
non_negative_int = _integer(0, "must not be negative")


def thread_count(text: str) -> int:
    """--threads: a positive integer, lowered to the CPUs this process may run on
    (``model.threads.thread_cap``) with one note on stderr."""
    import os
    import sys

    from model.threads import thread_cap

    value = positive_int(text)
    cap = thread_cap()
    if value > cap:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "gpt2-japanese"
        try:
            sys.stderr.write(f"{prog}: note: --threads {value} is more than the {cap} CPU(s) this process may run "
                             f"on; using {cap}\n")
        except (OSError, ValueError, AttributeError):
            pass
        value = cap
    return value


thread_count.__name__ = "integer"


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def number(text: str) -> float:
    """A finite float (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer from 0 to 2**64 - 1 (numpy's SeedSequence range)."""
    value = _integer(0, "must not be negative (seeds are 0 .. 2**64 - 1)")(text)
    if value >= 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be below 2**64, got {value}")
    return value


#: name -> (option strings, argparse keywords).  The name is the attribute on the parsed args.
FLAGS: Dict[str, Tuple[Tuple[str, ...], dict]] = {
    "model": (("--model",), dict(
        default=DEFAULT_MODEL,
        help="model directory (an unpacked gpt2ja-*.tar.bz2), or a released model name (gpt2ja-small, "
             "gpt2ja-medium, gpt2ja-large), downloaded into $GPT2JA_HOME (default "
             "$XDG_CACHE_HOME/gpt2-japanese or ~/.cache/gpt2-japanese) on first use; default %(default)s")),
    "vocab": (("--vocab",), dict(
        metavar="DIR", default=None,
        help="directory with another ja-bpe.txt and emoji.json (default: $GPT2JA_VOCAB, else the "
             "vocabulary of the released models, which ships in encoder/)")),
    "gpu": (("--gpu",), dict(
        default="0", help="GPU device id, or -1 for the CPU; without that GPU the CPU is used (default %(default)s)")),
    "verbose": (("--verbose",), dict(
        action="store_true", help="say what happens on stderr: device, engine, timings, TensorFlow's own messages")),
    "no_download": (("--no-download",), dict(
        dest="no_download", action="store_true",
        help="never use the network (as GPT2JA_OFFLINE=1): a released model that is not in the cache is "
             "an error saying what to download and where to put it")),
    "threads": (("--threads",), dict(
        type=thread_count, default=None, metavar="N",
        help="CPU threads for TensorFlow's pools, OpenBLAS and ONNX Runtime, at most the CPUs this process may "
             "run on (a larger N is lowered to that, with a note) (default: all of them, with decoding steps "
             "switching between one thread and all of them, whichever the machine runs faster at the moment)")),
    "output_file": (("--output_file",), dict(
        default="", metavar="FILE",
        help="write to FILE instead of stdout, atomically: a failed run leaves FILE as it was "
             "(a device or FIFO is written directly; a symlink's target is replaced)")),
    "context": (("--context",), dict(default=None, help="the text; '-' reads all of stdin")),
    "seed": (("--seed",), dict(type=seed, default=None,
                               help="random seed (0 .. 2**64-1): the same command and seed give the same output")),
    "batch_size": (("--batch_size",), dict(type=positive_int, default=16, metavar="N", help="rows per batch")),
    "batch_tokens": (("--batch_tokens",), dict(type=positive_int, default=2048, metavar="N",
                                               help="padded tokens per batch (default %(default)s)")),
    "pooling": (("--pooling",), dict(choices=("last", "mean"), default="last",
                                     help="last token's state (default, the original's) or the mean over the tokens")),
    "layer": (("--layer",), dict(type=int, default=-1, metavar="N",
                                 help="hidden state after block N (0-based) instead of the final layer norm "
                                      "(-1, default)")),
    "normalize": (("--normalize",), dict(action="store_true", help="scale every vector to unit L2 norm")),
    "exclude_end": (("--exclude-end",), dict(dest="exclude_end", action="store_true",
                                              help="do not score <|endoftext|> after the text")),
    "tokens": (("--tokens",), dict(action="store_true",
                                   help="also every token's log-probability (text: one 'token<TAB>logprob' line "
                                        "each, then an empty line; jsonl: a token_logprobs list)")),
    "stride": (("--stride",), dict(type=positive_int, default=None, metavar="N",
                                   help="for texts longer than the model's context (n_ctx tokens): windows of "
                                        "n_ctx tokens start every N tokens, so each token is predicted from at "
                                        "least n_ctx - N tokens before it (default n_ctx/2 = 512; below n_ctx)")),
    "top_k": (("--top_k",), dict(type=int, default=None,
                                 help="draw from the k most likely tokens (default 40, none with --top_p; "
                                      "0 = no limit)")),
    "top_p": (("--top_p",), dict(type=number, default=0.0,
                                 help="draw from the most likely tokens up to probability p (0 < p <= 1); "
                                      "replaces the default top_k; with an explicit --top_k both apply, "
                                      "top_k first")),
    # -- the sampler chain's controls (tasks.sampling, docs/sampling.md) --
    "repetition_penalty": (("--repetition_penalty",), dict(
        type=number, default=1.0, metavar="R",
        help="logits of tokens already in the context or the sample divided by R when positive, multiplied "
             "when negative (Hugging Face / CTRL; default 1 = off; 1.1-1.3 is usual)")),
    "presence_penalty": (("--presence_penalty",), dict(
        type=number, default=0.0, metavar="P",
        help="subtract P from the logit of every token the sample already drew (OpenAI's; default 0)")),
    "frequency_penalty": (("--frequency_penalty",), dict(
        type=number, default=0.0, metavar="F",
        help="subtract F times the number of times the sample drew a token from its logit (OpenAI's; "
             "default 0)")),
    "penalty_last_n": (("--penalty_last_n",), dict(
        type=int, default=-1, metavar="N",
        help="the three penalties look at the last N tokens of the context and the sample only "
             "(default -1: all of them; 0: penalties off; llama.cpp's default is 64)")),
    "no_repeat_ngram_size": (("--no_repeat_ngram_size",), dict(
        type=non_negative_int, default=0, metavar="N",
        help="never repeat an N-gram of the context or the sample (Hugging Face's; default 0 = off)")),
    "min_p": (("--min_p",), dict(
        type=number, default=0.0, metavar="P",
        help="keep the tokens at least P times as likely as the most likely one (0-1; default 0 = off)")),
    "typical_p": (("--typical_p",), dict(
        type=number, default=1.0, metavar="P",
        help="locally typical sampling: keep the tokens closest to the expected surprise, up to "
             "probability P (0 < P <= 1; default 1 = off)")),
    "dry_multiplier": (("--dry_multiplier",), dict(
        type=number, default=0.0, metavar="M",
        help="DRY: a token that would extend a repetition loses M * base^(length - allowed length) "
             "(llama.cpp's; default 0 = off; 0.8 is usual)")),
    "dry_base": (("--dry_base",), dict(type=number, default=1.75, metavar="B",
                                       help="DRY: the base (at least 1; default %(default)s)")),
    "dry_allowed_length": (("--dry_allowed_length",), dict(
        type=int, default=2, metavar="N",
        help="DRY: repetitions this long are not penalised (at least 1; default %(default)s)")),
    "dry_penalty_last_n": (("--dry_penalty_last_n",), dict(
        type=int, default=-1, metavar="N",
        help="DRY: look at the last N tokens (default -1: the context and the sample; 0: DRY off)")),
    "dry_sequence_breaker": (("--dry_sequence_breaker",), dict(
        action="append", default=None, metavar="STR",
        help="DRY: a repetition does not extend across a token whose text holds STR; repeatable, replaces "
             "the defaults (llama.cpp's: newline, ':', '\"', '*'); 'none': no breakers")),
    "xtc_probability": (("--xtc_probability",), dict(
        type=number, default=0.0, metavar="P",
        help="XTC: with probability P per token, remove every token above --xtc_threshold but the least "
             "likely of them (llama.cpp's; default 0 = off)")),
    "xtc_threshold": (("--xtc_threshold",), dict(type=number, default=0.1, metavar="T",
                                                 help="XTC: the probability threshold (default %(default)s)")),
    "logit_bias": (("--logit_bias",), dict(
        action="append", default=[], metavar="ID_OR_TEXT=BIAS",
        help="add BIAS to a token's logit: a token id, or a text that is exactly one token; repeatable")),
    "ban": (("--ban",), dict(
        action="append", default=[], metavar="ID_OR_TEXT",
        help="never draw this token: a token id, or a text that is exactly one token; repeatable")),
    "temperature": (("--temperature",), dict(type=number, default=1.0,
                                             help="divide logits by this (default 1); 0 means greedy")),
    "max_length": (("--max_length",), dict(type=non_negative_int, default=500,
                                           help="characters per sample at most (default 500)")),
    "min_length": (("--min_length",), dict(type=non_negative_int, default=0,
                                           help="tokens before <|endoftext|> may end a sample (default 0)")),
    "max_tokens": (("--max_tokens",), dict(
        type=non_negative_int, default=None, metavar="N",
        help="tokens per sample at most, beside --max_length characters (default: no limit); as the server's "
             "max_tokens")),
    "stop": (("--stop",), dict(
        action="append", default=[], metavar="STR",
        help="end a sample before the first occurrence of STR (not part of the text); repeatable; as the "
             "server's stop")),
    "num_generate": (("--num_generate",), dict(type=positive_int, default=5, help="samples per context (default 5)")),
    "clean_text": (("--clean_text",), dict(action="store_true",
                                           help="replace URLs, e-mail addresses, phone numbers, dates and prices "
                                                "by tags, as the original's clean_text")),
    "num_process": (("--num_process",), dict(type=positive_int, default=None, metavar="N",
                                             help="encoding processes (default: the CPUs, at most 8)")),
    "quantize": (("--quantize",), dict(
        choices=("none", "q8", "q4"), default="none",
        help="decode with 8-bit (q8) or 4-bit (q4) weights through ONNX Runtime: faster on a CPU, "
             "slightly different numbers; made from the checkpoint on first use and cached beside it "
             "(or under $GPT2JA_HOME/quantized); default none: float32 weights")),
    "precision": (("--precision",), dict(
        choices=PRECISIONS, default="fp32",
        help="forward pass: fp32 (default, the exact float32 path) or bf16: the transformer blocks' weight "
             "matrices in bfloat16, multiplied with float32 accumulation; faster on CPUs with AMX or AVX512_BF16 "
             "(elsewhere, where it would be emulated and slower, fp32 with a warning unless GPT2JA_BF16_EMULATE=1), "
             "with slightly different numbers (vectors within cosine 0.999 of "
             "fp32's, log-probabilities within about 0.1%%)")),
    "lora": (("--lora",), dict(
        metavar="DIR", default=None,
        help="a LoRA adapter made by gpt2-finetune.py --lora for this --model: its run directory "
             "(checkpoint/RUN_NAME) or an adapter-N.npz; merged into the weights as they load")),
    "progress": (("--progress",), dict(action="store_true",
                                       help="show progress bars even when stderr is not a terminal")),
}


#: The sampler chain's flags beyond the original's (gpt2-generate.py and gpt2-bulk.py generate).
SAMPLING_FLAGS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "penalty_last_n",
                  "no_repeat_ngram_size", "min_p", "typical_p", "dry_multiplier", "dry_base", "dry_allowed_length",
                  "dry_penalty_last_n", "dry_sequence_breaker", "xtc_probability", "xtc_threshold", "logit_bias",
                  "ban")


#: Set to 1 to run --precision bf16 even where bfloat16 products are emulated (slower than fp32).
EMULATE_BF16 = "GPT2JA_BF16_EMULATE"


def settle_precision(args, device: str = "/CPU:0", what: str = "runs") -> None:
    """--precision bf16 on a device that would emulate bfloat16 products (a CPU without AMX or
    AVX512_BF16, or TF_ENABLE_ONEDNN_OPTS=0: slower than float32) becomes fp32, with one warning
    line, unless $GPT2JA_BF16_EMULATE=1 asks for the emulation (to check bf16's numbers anywhere).
    ``what``: the verb of the warning ("runs", "trains")."""
    import os

    import model

    if getattr(args, "precision", "fp32") != "bf16" or model.bf16_native(device):
        return
    if os.environ.get(EMULATE_BF16, "").strip().lower() in ("1", "true", "yes"):
        return
    from .common import warn

    warn(f"this CPU has no AMX or AVX512_BF16 (or TF_ENABLE_ONEDNN_OPTS=0): bfloat16 products would be "
         f"emulated and slower than fp32, so --precision bf16 {what} as fp32 ({EMULATE_BF16}=1 emulates anyway)")
    args.precision = "fp32"


def use_precision(m) -> None:
    """Once the tool holds only ``m``, the model of its ``Vectorizer``/``Scorer`` made with
    --precision: frees the float32 model it replaced."""
    import gc

    if m.precision != "fp32":
        gc.collect()  # the float32 model it replaced (reference cycles through its compiled functions)


def add(parser: argparse.ArgumentParser, *names: str, **overrides: dict) -> None:
    """Add the flags ``names`` (keys of FLAGS) to ``parser``; ``overrides[name]``
    replaces keywords of that flag's declaration (e.g. ``batch_tokens={"default": 4096}``)."""
    unknown = [n for n in [*names, *overrides] if n not in FLAGS]
    if unknown:
        raise KeyError(f"undeclared flags: {unknown}")
    extra = [n for n in overrides if n not in names]
    if extra:
        raise KeyError(f"overrides for flags not added: {extra}")
    for name in names:
        strings, kwargs = FLAGS[name]
        parser.add_argument(*strings, **{**kwargs, **overrides.get(name, {})})


def add_model_flags(parser: argparse.ArgumentParser, **overrides: dict) -> None:
    """--model, --lora, --vocab, --gpu, --threads, --verbose, --no-download: the flags every model tool has."""
    add(parser, "model", "lora", "vocab", "gpu", "threads", "verbose", "no_download", **overrides)
