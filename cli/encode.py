"""gpt2-encode.py: text files -> an .npz of token arrays for gpt2-finetune.py (the original's encode_bpe.py)."""
from __future__ import annotations

import argparse
import os
import sys

from . import common
from .errors import ArgumentParser, UsageError


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-encode.py",
        description="Encode a directory of .txt files (recursively) into an .npz dataset for "
                    "gpt2-finetune.py, in the format of the original encode_bpe.py: members arr_0, arr_1, ... "
                    "are token arrays; every file is one document followed by <|endoftext|>.",
        epilog="Example: python gpt2-encode.py --src_dir novels/ --dst_file novels.npz --clean_text")
    p.add_argument("--src_dir", required=True, help="directory of .txt files (searched recursively), or one .txt file")
    p.add_argument("--dst_file", required=True, help="the .npz to write (.npz is added when missing, as numpy does)")
    p.add_argument("--num_process", type=common.positive_int, default=min(8, os.cpu_count() or 1),
                   help="encoding processes (default: the CPU count, at most 8)")
    p.add_argument("--combine", type=common.positive_int, default=50000,
                   help="join documents into arrays of at least this many characters (default 50000)")
    p.add_argument("--clean_text", action="store_true",
                   help="replace URLs, e-mail addresses, phone numbers, dates and prices by tags, as the original")
    p.add_argument("--vocab", metavar="DIR", default=None,
                   help="directory with another ja-bpe.txt and emoji.json (default: as the other tools)")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    p.add_argument("--verbose", action="store_true", help="say what happens on stderr")
    return p


def encode(src, dst, enc, clean=False, processes=1, combine=50000, show_progress=False):
    """Library form of the tool: returns (files, tokens, path written)."""
    from tasks import dataset as D

    if not dst.endswith(".npz"):
        dst += ".npz"
    paths = D.find_texts(src)

    def bar(it, total):
        return common.progress(it, total=total, desc="encoding", unit="file", force=show_progress)

    arrays = D.encode_files(paths, enc, clean=clean, processes=processes, combine=combine, progress=bar)
    D.save_npz(dst, arrays)
    return len(paths), int(sum(len(a) for a in arrays)), dst


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from tasks.dataset import DatasetError

    enc = common.load_encoder(args)
    try:
        files, tokens, dst = encode(args.src_dir, args.dst_file, enc, clean=args.clean_text,
                                            processes=args.num_process, combine=args.combine,
                                            show_progress=args.progress)
    except DatasetError as e:
        raise UsageError(str(e)) from None
    sys.stderr.write(f"{dst}: {files} file(s), {tokens} tokens\n")
    return 0
