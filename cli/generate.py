"""gpt2-generate.py: generate Japanese text with a gpt2ja model."""
from __future__ import annotations

import argparse
import json

from . import common, flags, io
from .errors import ArgumentParser, UsageError

DEFAULT_NUM_GENERATE = 5


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-generate.py",
        description="Generate text with a Japanese GPT-2 model (gpt2ja-small/medium/large).",
        epilog="Samples are separated by a line '========'. Example: "
               "python gpt2-generate.py --model gpt2ja-small --context '江戸時代の' --top_k 20 --num_generate 3",
    )
    flags.add_model_flags(p)
    flags.add(p, "output_file", "context", "num_generate", "top_k", "top_p", "temperature", "max_length",
              "min_length", "seed", "batch_size", "quantize",
              context={"help": "text to continue (default <|endoftext|>, i.e. from scratch); '-' reads all of stdin"},
              num_generate={"default": None,
                            "help": f"samples per context (default {DEFAULT_NUM_GENERATE}; 1 with --stream)"},
              min_length={"type": int},  # the original takes any integer; below 1 means no minimum
              batch_size={"help": "samples decoded together, from as many contexts as it takes (default "
                                  "%(default)s); larger batches give more tokens per second on a CPU and use "
                                  "more memory"})
    flags.add(p, "max_tokens", "stop", *flags.SAMPLING_FLAGS)
    p.add_argument("--contexts", metavar="FILE", default=None,
                   help="one context per line (FILE or '-' for stdin); --num_generate samples for each")
    p.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help="text (default): samples separated by '========' lines; jsonl: one JSON object "
                        "{context, index, text} per sample, flushed as it is done")
    p.add_argument("--stream", action="store_true",
                   help="print the text as it is produced (one sample of one context, text format)")
    p.add_argument("--engine", choices=("auto", "numpy", "tf", "onnx"), default="auto",
                   help="decoding engine: onnx (ONNX Runtime: float32, and what --quantize uses), numpy (the "
                        "float32 reference), tf (TensorFlow; used on a GPU); default auto: onnx on a CPU (its own "
                        "copy of the weights in memory: only while the available memory holds it twice over, else "
                        "numpy), tf on a GPU")
    return p


def _check(args) -> None:
    """Rules between flags (each flag's own values are checked where they are used)."""
    if any(s == "" for s in args.stop):
        raise UsageError("--stop needs a non-empty string")
    if args.context is not None and args.contexts is not None:
        raise UsageError("--context and --contexts are exclusive")
    if args.context == "-" and args.contexts == "-":
        raise UsageError("stdin cannot be both the context and the contexts")
    if args.quantize != "none" and args.engine not in ("auto", "onnx"):
        raise UsageError(f"--quantize {args.quantize} decodes with the onnx engine: leave out --engine {args.engine}")
    if args.stream:
        if args.num_generate not in (None, 1) or args.contexts is not None:
            raise UsageError("--stream prints one sample: use it with --num_generate 1 and a single --context")
        if args.format != "text" or args.output_file:
            raise UsageError("--stream prints text to stdout: it cannot be combined with --format jsonl or --output_file")


def options_from(args, enc=None):
    """The GenerateOptions the flags ask for (validated there).  ``enc``: the encoder that turns the
    texts of --logit_bias and --ban into token ids (loaded here from --vocab when needed and not given)."""
    from tasks.generate import GenerateOptions
    from tasks.sampling import DRY_BREAKERS

    if (args.logit_bias or args.ban) and enc is None:
        enc = common.load_encoder(args)
    bias = {}
    for item in args.logit_bias:
        token, sep, value = item.rpartition("=")
        if not sep or not token:
            raise UsageError(f"--logit_bias takes ID_OR_TEXT=BIAS, got {item!r}")
        try:
            bias[token_id(enc, token, "--logit_bias")] = float(value)
        except ValueError:
            raise UsageError(f"--logit_bias {item}: the bias must be a number, got {value!r}") from None
    ban = [token_id(enc, text, "--ban") for text in args.ban]
    if args.dry_sequence_breaker is not None and "" in args.dry_sequence_breaker:
        raise UsageError("--dry_sequence_breaker needs a non-empty string ('none' for no breakers)")
    breakers = DRY_BREAKERS if args.dry_sequence_breaker is None else \
        tuple(b for b in args.dry_sequence_breaker if b != "none")
    return GenerateOptions(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                           min_length=max(args.min_length, 0), max_length=args.max_length, seed=args.seed,
                           max_tokens=args.max_tokens, stop=tuple(args.stop),
                           repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                           frequency_penalty=args.frequency_penalty, penalty_last_n=args.penalty_last_n,
                           no_repeat_ngram_size=args.no_repeat_ngram_size, min_p=args.min_p,
                           typical_p=args.typical_p, dry_multiplier=args.dry_multiplier, dry_base=args.dry_base,
                           dry_allowed_length=args.dry_allowed_length, dry_penalty_last_n=args.dry_penalty_last_n,
                           dry_sequence_breakers=breakers, xtc_probability=args.xtc_probability,
                           xtc_threshold=args.xtc_threshold, logit_bias=bias, ban=tuple(ban))


def token_id(enc, text: str, flag: str) -> int:
    """A token named on the command line: its id (digits), or a text the encoder makes exactly one token."""
    n_vocab = len(enc)
    if text.isascii() and text.isdigit():
        i = int(text)
        if i >= n_vocab:
            raise UsageError(f"{flag} {text}: no such token id (the vocabulary has ids 0 .. {n_vocab - 1})")
        return i
    ids = enc.encode(text)
    if len(ids) != 1:
        pieces = " ".join(enc.token_text(i) for i in ids) or "none"
        raise UsageError(f"{flag} {text!r}: must be exactly one token, but it is {len(ids)} ({pieces}); give "
                         "one token's text or id (python -m encoder shows them)")
    return ids[0]


def _contexts(args):
    """The contexts to continue: read lazily for --contexts; the one --context as a list, so that
    the generator sizes its batch (and its memory check) by the samples planned, at most
    --num_generate, not by --batch_size."""
    if args.contexts is not None:
        return (line for _, line in io.read_lines(args.contexts))
    return [io.read_context(args.context, default="<|endoftext|>")]


def _render(fmt: str):
    if fmt == "jsonl":
        return lambda s: json.dumps({"context": s.context, "index": s.index, "text": s.text}, ensure_ascii=False) + "\n"
    return lambda s: s.text + "\n"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _check(args)
    num = args.num_generate or (1 if args.stream else DEFAULT_NUM_GENERATE)
    enc = common.load_encoder(args) if args.logit_bias or args.ban else None
    options = options_from(args, enc)  # flag values are checked before the model is looked for
    from tasks.generate import Generator

    enc = enc or common.load_encoder(args)
    quantize = None if args.quantize == "none" else args.quantize
    m = common.load_model(args, enc, quantize=quantize, engine=args.engine)
    generator = Generator(m, enc, engine=args.engine, quantize=quantize)
    contexts = 1 if args.contexts is None else None
    dec = generator.engine(rows=Generator.planned_rows(num, args.batch_size, contexts))
    if quantize is not None:  # quantized weights: made now or read from the cache
        made = "made and cached in" if dec.quantized_now else "read from"
        common.log(args, f"{quantize} weights {made} {dec.quantized_path}")
    common.log(args, f"engine: {generator.engine_name}" + (f" ({quantize})" if quantize else ""))

    with io.output(args.output_file) as out:
        if args.stream:
            def on_text(_, piece):
                out.write(piece)
                out.flush()

            generator.generate(_contexts(args)[0], 1, options, on_text=on_text)
            out.write("\n")
            out.flush()
        else:
            # Contexts typed by a person are answered one by one, not read ahead.
            read_ahead = args.contexts is None or io.lines_per_batch(args.contexts, 2) > 1
            # On a terminal: tokens generated and tokens/s, with the samples done.
            bar = io.progress(desc="generating", unit="tok")
            writer = io.Writer(out, _render(args.format), between="" if args.format == "jsonl" else "========\n",
                               bar=bar)
            try:
                for sample in generator.generate_many(_contexts(args), num, options, batch_size=args.batch_size,
                                                      read_ahead=read_ahead, progress=bar.update):
                    bar.set_postfix(samples=writer.count + 1, refresh=False)
                    writer.write(sample)
            finally:
                bar.close()
    common.report_end(args, generator.stats.line())
    return 0
