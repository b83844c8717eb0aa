"""gpt2-transform.py: sentence vectors from a gpt2ja model."""
from __future__ import annotations

import argparse
import json

from . import common
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
    common.add_model_flags(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--context", default=None, help="the text to turn into a vector; '-' reads all of stdin")
    src.add_argument("--input", metavar="FILE", default=None,
                     help="one text per line (FILE or '-' for stdin): one vector per line")
    p.add_argument("--format", choices=("json", "jsonl", "npy", "tsv"), default="json",
                   help="json (default, the original's): a list of numbers per line; jsonl: "
                        '{"text", "vector"} per line; tsv: tab-separated numbers per line; '
                        "npy: an [N, n_embd] float32 array written to --output_file")
    p.add_argument("--output_file", default="", help="write to this file instead of stdout (atomically); "
                   "required with --format npy")
    p.add_argument("--pooling", choices=("last", "mean"), default="last",
                   help="last token's state (default, the original's) or the mean over the tokens")
    p.add_argument("--layer", type=int, default=-1,
                   help="hidden state after block N (0-based) instead of the final layer norm (-1, default)")
    p.add_argument("--normalize", action="store_true", help="scale every vector to unit L2 norm")
    p.add_argument("--batch_tokens", type=common.positive_int, default=4096,
                   help="padded tokens per batch (default 4096)")
    return p


def format_vector(vector) -> str:
    """The original's output: Python's list repr of the float32 values widened to float."""
    return "[" + ", ".join(repr(x) for x in vector.astype(float).tolist()) + "]"


class _Writer:
    def __init__(self, out, fmt: str):
        self.out = out
        self.fmt = fmt
        self.rows = []  # npy: collected

    def write(self, text: str, vector) -> None:
        if self.fmt == "npy":
            self.rows.append(vector)
            return
        if self.fmt == "json":
            line = format_vector(vector)
        elif self.fmt == "jsonl":
            line = '{"text": ' + json.dumps(text, ensure_ascii=False) + ', "vector": ' + format_vector(vector) + "}"
        else:
            line = "\t".join(repr(x) for x in vector.astype(float).tolist())
        self.out.write(line + "\n")

    def flush(self) -> None:
        if self.fmt != "npy":
            self.out.flush()


def _texts(args):
    """(line number or None, text) for each input text."""
    if args.input is not None:
        yield from common.read_lines(args.input)
    elif args.context == "-":
        text = common.read_stdin_text()
        if text.endswith("\n"):
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
        yield None, text
    else:
        yield None, args.context


def _where(number) -> str:
    return "the context" if number is None else f"line {number}"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.context is None and args.input is None:
        raise UsageError("give the text with --context TEXT (or --context - for stdin) or --input FILE")
    if args.format == "npy" and not args.output_file:
        raise UsageError("--format npy writes a binary file: give it with --output_file")
    enc = common.load_encoder(args)
    m = common.load_model(args, enc)
    n_layer = m.hparams.n_layer
    if not -1 <= args.layer < n_layer:
        raise UsageError(f"--layer must be -1 (final) or 0..{n_layer - 1} for this model, got {args.layer}")
    from tasks.vectors import Vectorizer

    vec = Vectorizer(m, enc, pooling=args.pooling, layer=args.layer, normalize=args.normalize,
                     max_tokens=args.batch_tokens)

    def process(chunk, writer):
        id_lists = []
        for number, text in chunk:
            ids, truncated = vec.ids(text)
            if truncated:
                common.warn(f"{_where(number)}: longer than {m.hparams.n_ctx} tokens; using its last "
                            f"{m.hparams.n_ctx} tokens")
            if not text:
                common.warn(f"{_where(number)}: empty; its vector is that of <|endoftext|>")
            id_lists.append(ids)
        for (number, text), vector in zip(chunk, vec.vectors_of_ids(id_lists)):
            writer.write(text, vector)
        writer.flush()

    def run(out):
        writer = _Writer(out, args.format)
        bar = common.progress(desc="vectors", unit="line") if args.input is not None else None
        chunk = []
        per_batch = common.lines_per_batch(args.input, CHUNK_LINES) if args.input is not None else CHUNK_LINES
        try:
            for item in _texts(args):
                chunk.append(item)
                if len(chunk) >= per_batch:
                    process(chunk, writer)
                    if bar is not None:
                        bar.update(len(chunk))
                    chunk = []
        except UsageError:
            if chunk:
                process(chunk, writer)  # everything read before the error is written
            raise
        finally:
            if bar is not None:
                bar.close()
        if chunk:
            process(chunk, writer)
        if args.format == "npy":
            import numpy as np

            rows = np.stack(writer.rows) if writer.rows else np.zeros((0, m.hparams.n_embd), np.float32)
            np.save(out, rows.astype(np.float32))

    with common.output(args.output_file, binary=args.format == "npy") as out:
        run(out)
    return 0
