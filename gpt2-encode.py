#!/usr/bin/env python3
"""Encode text files into an .npz dataset for gpt2-finetune.py.  See --help and README.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli.encode import main  # noqa: E402
from cli.errors import run  # noqa: E402

if __name__ == "__main__":
    run(main, prog="gpt2-encode.py")
