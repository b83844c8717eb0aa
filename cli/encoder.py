"""Encode and decode text in pipelines.

    python -m encoder encode [--vocab DIR] [--clean]  < texts.txt  > ids.jsonl
    python -m encoder decode [--vocab DIR] [--json]   < ids.jsonl  > texts.txt

encode reads UTF-8 text, one text per line (the line's own "\\n" or "\\r\\n"
is not part of the text), and prints one JSON array of token ids per line.
decode reads such arrays, one per line, and prints one text per line: line
breaks inside a text are written as the two characters "\\n" ("\\r" for a
carriage return) so that output line N always belongs to input line N; with
--json each text is printed as a JSON string instead, which is lossless.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import flags
from .errors import ArgumentParser, UsageError
from .io import read_lines


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m encoder",
        description="Japanese BPE encoder of the gpt2ja models, for pipelines.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{encode,decode}")
    enc = sub.add_parser("encode", help="text lines on stdin -> JSON id arrays on stdout")
    enc.add_argument("--clean", action="store_true", help="apply clean_text (zenkaku->hankaku, <URL>, <DATE>, ...)")
    dec = sub.add_parser("decode", help="JSON id arrays on stdin -> text lines on stdout")
    dec.add_argument("--json", action="store_true", help="print each text as a JSON string (lossless)")
    for s in (enc, dec):
        flags.add(s, "vocab")
    return p


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _encode(enc, args, out) -> None:
    for number, text in read_lines("-"):
        try:
            ids = enc.encode(text, clean=args.clean)
        except ValueError as e:
            raise UsageError(f"line {number}: {e}") from None
        out.write(json.dumps(ids, separators=(",", ":")) + "\n")


def _decode(enc, args, out) -> None:
    n_vocab = len(enc)
    for number, text in read_lines("-"):
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"line {number}: not a JSON array of token ids ({e.msg})") from None
        except RecursionError:  # arrays nested thousands deep
            raise UsageError(f"line {number}: not a JSON array of token ids") from None
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise UsageError(f"line {number}: not a JSON array of token ids")
        bad = next((i for i in ids if not 0 <= i < n_vocab), None)
        if bad is not None:
            raise UsageError(f"line {number}: token id {bad} is out of range (vocabulary size {n_vocab})")
        decoded = enc.decode(ids)
        out.write((json.dumps(decoded, ensure_ascii=False) if args.json else _one_line(decoded)) + "\n")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import encoder

    enc = encoder.load(args.vocab)
    out = sys.stdout
    if args.command == "encode":
        _encode(enc, args, out)
    else:
        _decode(enc, args, out)
    return 0

