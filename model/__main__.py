"""Fetch the released models and the vocabulary ahead of time.

    python -m model download gpt2ja-medium [gpt2ja-small ...]
    python -m model download --vocab

Each model is downloaded (resuming a partial download), extracted, checked to
be a loadable checkpoint and moved into the cache ($GPT2JA_HOME, default
~/.cache/gpt2-japanese) -- the same as the tools do on first use.  The
vocabulary is fetched too (checked against its sha256 digests) unless it is
found already, so that afterwards the tools run with GPT2JA_OFFLINE=1.  The
directory of each model (and of the vocabulary with --vocab) is printed on
stdout, one per line, whether it was downloaded now or found in the cache.
"""
from __future__ import annotations

import argparse
import os

from cli.errors import UsageError, run

from . import hub


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model",
        description="Tools for the gpt2ja models.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{download}")
    d = sub.add_parser(
        "download",
        help="fetch released models (and the vocabulary) into the cache",
        description="Download released models into $GPT2JA_HOME (default ~/.cache/gpt2-japanese), "
                    "with resume, checks and safe extraction, and the vocabulary when it is not "
                    "found; print each directory. Addresses: $GPT2JA_MODEL_URLS, $GPT2JA_VOCAB_URL.",
        epilog="example: python -m model download gpt2ja-medium",
    )
    d.add_argument("names", nargs="*", metavar="NAME", help="released model: " + ", ".join(hub.RELEASED_MODELS))
    d.add_argument("--vocab", action="store_true",
                   help="fetch the vocabulary into the cache (alone when no NAME is given)")
    d.add_argument("--progress", action="store_true", help="show progress bars even when stderr is not a terminal")
    return p


def _vocab_found() -> bool:
    import encoder

    try:
        encoder.find_vocab()
        return True
    except encoder.VocabError:
        return hub.cached_vocab() is not None


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not args.names and not args.vocab:
        raise UsageError("name a model to download (" + ", ".join(hub.RELEASED_MODELS) + "), or give --vocab")
    for name in args.names:
        if not hub.is_released(name):
            raise UsageError(f"unknown model {name!r}; released models: {', '.join(hub.RELEASED_MODELS)}")
    progress = True if args.progress else None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the check reads the checkpoint with TensorFlow
    if args.vocab:
        print(hub.download_vocab(progress=progress), flush=True)
    elif not _vocab_found():
        hub.download_vocab(progress=progress)
    for name in dict.fromkeys(args.names):
        print(hub.download_model(name, progress=progress), flush=True)
    return 0


if __name__ == "__main__":
    run(main, prog="python -m model")
