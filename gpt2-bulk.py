#!/usr/bin/env python3
"""Vectors, scores and samples of many lines on a Ray cluster.  See --help and README.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli.errors import run  # noqa: E402
from cli.bulk import main  # noqa: E402

if __name__ == "__main__":
    run(main, prog="gpt2-bulk.py")
