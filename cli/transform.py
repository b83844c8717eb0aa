"""gpt2-transform.py: sentence vectors from a gpt2ja model."""
from __future__ import annotations

import argparse
import json

from . import common, flags, io
from .errors import ArgumentParser, UsageError

CHUNK_LINES = 512  # lines read, batched and written at a time with --input


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-transform.py",
        description="Sentence vectors from a Japanese GPT-2 model: the final layer-normed hidden state "
                    "at the last token (as the original tool), or other poolings and layers.",
        epilog="Example: python gpt2-transform.py --model gpt2ja-small --input sentences.txt --format npy "
               "--output_file vectors.npy",
    )
    flags.add_model_flags(p)
    src = p.add_mutually_exclusive_group()
    flags.add(src, "context", context={"help": "the text to turn into a vector; '-' reads all of stdin"})
    src.add_argument("--input", metavar="FILE", default=None,
                     help="one text per line (FILE or '-' for stdin): one vector per line")
    p.add_argument("--format", choices=("json", "jsonl", "npy", "tsv"), default="json",
                   help="json (default, the original's): a list of numbers per line; jsonl: "
                        '{"text", "vector"} per line; tsv: tab-separated numbers per line; '
                        "npy: an [N, n_embd] float32 array written to --output_file")
    flags.add(p, "output_file", "pooling", "layer", "normalize", "batch_tokens", "precision",
              output_file={"help": "write to FILE instead of stdout (atomically); required with --format npy"},
              batch_tokens={"default": 4096})
    return p


def format_vector(vector) -> str:
    """The original's output: Python's list repr of the float32 values widened to float."""
    return "[" + ", ".join(repr(x) for x in vector.astype(float).tolist()) + "]"


RENDER = {
    "json": lambda item: format_vector(item[1]) + "\n",
    "jsonl": lambda item: '{"text": ' + json.dumps(item[0], ensure_ascii=False) + ', "vector": '
                          + format_vector(item[1]) + "}\n",
    "tsv": lambda item: "\t".join(repr(x) for x in item[1].astype(float).tolist()) + "\n",
}


def _texts(args):
    """(line number or None, text) for each input text."""
    if args.input is not None:
        yield from io.read_lines(args.input)
    else:
        yield None, io.read_context(args.context)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.context is None and args.input is None:
        raise UsageError("give the text with --context TEXT (or --context - for stdin) or --input FILE")
    if args.format == "npy" and not args.output_file:
        raise UsageError("--format npy writes a binary file: give it with --output_file")
    enc = common.load_encoder(args)
    m = common.load_model(args, enc)
    from tasks.vectors import Vectorizer

    vec = Vectorizer(m, enc, pooling=args.pooling, layer=args.layer, normalize=args.normalize,
                     max_tokens=args.batch_tokens, precision=args.precision)
    m = vec.model  # with --precision bf16 its copy: the float32 model is dropped
    flags.use_precision(m)

    def where(number) -> str:
        return "the context" if number is None else f"line {number}"

    import time

    t0 = time.perf_counter()
    with io.output(args.output_file, binary=args.format == "npy") as out:
        npy = args.format == "npy"
        bar = io.progress(desc="vectors", unit="line") if args.input is not None else None
        writer = io.NpyWriter(out, m.hparams.n_embd) if npy else io.Writer(out, RENDER[args.format], bar=bar)
        per_batch = io.lines_per_batch(args.input, CHUNK_LINES) if args.input is not None else 1
        try:
            for chunk in io.chunks(_texts(args), per_batch):
                id_lists = []
                for number, text in chunk:
                    ids, truncated = vec.ids(text)
                    if truncated:
                        common.warn(f"{where(number)}: longer than {m.hparams.n_ctx} tokens; using its last "
                                    f"{m.hparams.n_ctx} tokens")
                    if not text:
                        common.warn(f"{where(number)}: empty; its vector is that of <|endoftext|>")
                    id_lists.append(ids)
                for (_, text), vector in zip(chunk, vec.vectors_of_ids(id_lists)):
                    writer.write(vector if npy else (text, vector))
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        writer.close()
    seconds = time.perf_counter() - t0
    common.report_end(args, f"vectors: {writer.count} in {seconds:.2f} s ({writer.count / max(seconds, 1e-9):.1f}/s)")
    return 0
