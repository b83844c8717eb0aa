"""gpt2-encode.py: text files -> an .npz of token arrays for gpt2-finetune.py (the original's encode_bpe.py)."""
from __future__ import annotations

import argparse
import os
import sys

from . import common, flags, io
from .errors import ArgumentParser


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-encode.py",
        description="Encode a directory of .txt files (recursively) into an .npz dataset for "
                    "gpt2-finetune.py, in the format of the original encode_bpe.py: members arr_0, arr_1, ... "
                    "are token arrays; every file is one document followed by <|endoftext|>.",
        epilog="Example: python gpt2-encode.py --src_dir novels/ --dst_file novels.npz --clean_text")
    p.add_argument("--src_dir", required=True, help="directory of .txt files (searched recursively), or one .txt file")
    p.add_argument("--dst_file", required=True, help="the .npz to write (.npz is added when missing, as numpy does)")
    p.add_argument("--combine", type=flags.positive_int, default=50000,
                   help="join documents into arrays of at least this many characters (default 50000)")
    flags.add(p, "num_process", "clean_text", "vocab", "progress", "verbose")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from tasks import dataset as D

    enc = common.load_encoder(args)

    def bar(it, total):
        return io.progress(it, total=total, desc="encoding", unit="file", force=args.progress)

    files, tokens, dst = D.make_dataset(args.src_dir, args.dst_file, enc, clean=args.clean_text,
                                        processes=args.num_process or min(8, os.cpu_count() or 1),
                                        combine=args.combine, progress=bar)
    sys.stderr.write(f"{dst}: {files} file(s), {tokens} tokens\n")
    return 0
