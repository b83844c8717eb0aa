"""Fetch the released models ahead of time.

    python -m model download gpt2ja-medium [gpt2ja-small ...]

Each model is downloaded (resuming a partial download), extracted, checked to
be a loadable checkpoint and moved into the cache ($GPT2JA_HOME, default
~/.cache/gpt2-japanese) -- the same as the tools do on first use -- so that
afterwards the tools run with GPT2JA_OFFLINE=1 (the vocabulary ships with the
encoder package).  The directory of each model is printed on stdout, one per
line, whether it was downloaded now or found in the cache.
"""
from __future__ import annotations

import argparse
import os

import hub

from .errors import ArgumentParser, UsageError


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m model",
        description="Tools for the gpt2ja models.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{download}")
    d = sub.add_parser(
        "download",
        help="fetch released models into the cache",
        description="Download released models into $GPT2JA_HOME (default ~/.cache/gpt2-japanese), "
                    "with resume, checks and safe extraction; print each directory. "
                    "Addresses: $GPT2JA_MODEL_URLS.",
        epilog="example: python -m model download gpt2ja-medium",
    )
    d.add_argument("names", nargs="+", metavar="NAME", help="released model: " + ", ".join(hub.RELEASED_MODELS))
    d.add_argument("--progress", action="store_true", help="show progress bars even when stderr is not a terminal")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for name in args.names:
        if not hub.is_released(name):
            raise UsageError(f"unknown model {name!r}; released models: {', '.join(hub.RELEASED_MODELS)}")
    progress = True if args.progress else None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the check reads the checkpoint with TensorFlow
    for name in dict.fromkeys(args.names):
        print(hub.download_model(name, progress=progress), flush=True)
    return 0

