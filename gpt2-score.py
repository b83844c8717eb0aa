#!/usr/bin/env python3
"""Log-probabilities of sentences under a gpt2ja model.  See --help and README.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli.errors import run  # noqa: E402
from cli.score import main  # noqa: E402

if __name__ == "__main__":
    run(main, prog="gpt2-score.py")
