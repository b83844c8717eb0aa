"""gpt2-generate.py: generate Japanese text with a gpt2ja model."""
from __future__ import annotations

import argparse
import json

from . import common
from .errors import ArgumentParser, UsageError

DEFAULT_TOP_K = 40
DEFAULT_BATCH_SIZE = 16


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-generate.py",
        description="Generate text with a Japanese GPT-2 model (gpt2ja-small/medium/large).",
        epilog="Samples are separated by a line '========'. Example: "
               "python gpt2-generate.py --model gpt2ja-small --context '江戸時代の' --top_k 20 --num_generate 3",
    )
    common.add_model_flags(p)
    p.add_argument("--output_file", default="", help="write the samples to this file instead of stdout "
                   "(written atomically: a failed run leaves no partial file)")
    p.add_argument("--context", default=None,
                   help="text to continue (default <|endoftext|>, i.e. from scratch); '-' reads all of stdin")
    p.add_argument("--contexts", metavar="FILE", default=None,
                   help="one context per line (FILE or '-' for stdin); --num_generate samples for each")
    p.add_argument("--num_generate", type=common.positive_int, default=5, help="samples per context (default 5)")
    p.add_argument("--top_k", type=int, default=None,
                   help=f"draw from the k most likely tokens (default {DEFAULT_TOP_K}; 0 = no limit)")
    p.add_argument("--top_p", type=float, default=0.0,
                   help="draw from the most likely tokens up to probability p (0 < p <= 1); "
                        "overrides the default top_k; exclusive with an explicit --top_k")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divide logits by this (default 1); 0 means greedy (always the most likely token)")
    p.add_argument("--max_length", type=common.non_negative_int, default=500,
                   help="characters per sample at most (default 500)")
    p.add_argument("--min_length", type=int, default=0,
                   help="tokens before <|endoftext|> may end a sample (default 0)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same command and seed give the same output")
    p.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help="text (default): samples separated by '========' lines; jsonl: one JSON object "
                        "{context, index, text} per sample, flushed as it is done")
    p.add_argument("--stream", action="store_true",
                   help="print the text as it is produced (one sample, one context, text format)")
    p.add_argument("--batch_size", type=common.positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"samples decoded together, from as many contexts as it takes (default {DEFAULT_BATCH_SIZE}); "
                        "larger batches give more tokens per second on a CPU and use more memory")
    p.add_argument("--engine", choices=("auto", "numpy", "tf"), default="auto",
                   help="decoding engine: numpy (fastest on a CPU), tf (TensorFlow; used on a GPU); default auto")
    return p


def _check(args) -> None:
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top_k must not be negative, got {args.top_k}")
    if not 0.0 <= args.top_p <= 1.0:
        raise UsageError(f"--top_p must be between 0 and 1, got {args.top_p}")
    if args.top_p > 0 and args.top_k is not None and args.top_k > 0:
        raise UsageError("--top_k and --top_p are exclusive: give one of them")
    if not (args.temperature >= 0.0) or args.temperature == float("inf"):
        raise UsageError(f"--temperature must be positive, or 0 for greedy decoding, got {args.temperature}")
    if args.context is not None and args.contexts is not None:
        raise UsageError("--context and --contexts are exclusive")
    if args.stream:
        if args.num_generate != 1 or args.contexts is not None:
            raise UsageError("--stream prints one sample: use it with --num_generate 1 and a single --context")
        if args.format != "text" or args.output_file:
            raise UsageError("--stream prints text to stdout: it cannot be combined with --format jsonl or --output_file")
    if args.context == "-" and args.contexts == "-":
        raise UsageError("stdin cannot be both the context and the contexts")


def _contexts(args):
    """(index, context) pairs, read lazily for --contexts."""
    if args.contexts is not None:
        for number, line in common.read_lines(args.contexts):
            yield number - 1, line
        return
    if args.context == "-":
        text = common.read_stdin_text()
        if text.endswith("\n"):
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
        yield 0, text
    else:
        yield 0, "<|endoftext|>" if args.context is None else args.context


class _Writer:
    """Prints samples in the chosen format; text samples are separated by '========'."""

    def __init__(self, out, fmt: str):
        self.out = out
        self.fmt = fmt
        self.count = 0

    def sample(self, context: str, index: int, text: str) -> None:
        if self.fmt == "jsonl":
            self.out.write(json.dumps({"context": context, "index": index, "text": text}, ensure_ascii=False) + "\n")
        else:
            if self.count:
                self.out.write("========\n")
            self.out.write(text + "\n")
        self.count += 1
        self.out.flush()


def _stream_to(out):
    def on_text(_, piece):
        out.write(piece)
        out.flush()

    return on_text


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _check(args)
    from tasks.generate import GenerateOptions, Generator

    top_k = DEFAULT_TOP_K if args.top_k is None else args.top_k
    if args.top_p > 0:
        top_k = 0  # top_p overrides the default top_k
    options = GenerateOptions(top_k=top_k, top_p=args.top_p, temperature=args.temperature,
                              min_length=max(args.min_length, 0), max_length=args.max_length, seed=args.seed)
    enc = common.load_encoder(args)
    m = common.load_model(args, enc)
    if options.min_length >= m.hparams.n_ctx // 2:
        raise UsageError(f"--min_length must be below n_ctx/2 = {m.hparams.n_ctx // 2}, got {args.min_length}")
    generator = Generator(m, enc, engine=args.engine)
    common.log(args, f"engine: {generator.engine_name}")

    def run(out):
        if args.stream:
            _, context = next(_contexts(args))
            generator.generate(context, 1, options, on_text=_stream_to(out))
            out.write("\n")
            out.flush()
            return
        writer = _Writer(out, args.format)
        # Contexts typed by a person are answered one by one, not read ahead.
        read_ahead = args.contexts is None or common.lines_per_batch(args.contexts, 2) > 1
        contexts = (context for _, context in _contexts(args))
        bar = common.progress(desc="samples", unit="sample", total=None if args.contexts else args.num_generate)
        try:
            for sample in generator.generate_many(contexts, args.num_generate, options, batch_size=args.batch_size,
                                                  read_ahead=read_ahead):
                writer.sample(sample.context, sample.index, sample.text)
                bar.update(1)
        finally:
            bar.close()

    with common.output(args.output_file) as out:
        run(out)
    return 0
