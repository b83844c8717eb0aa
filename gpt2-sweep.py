#!/usr/bin/env python3
"""Measure what sampling settings do to generated text.  See --help and docs/sweep.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli.errors import run  # noqa: E402
from cli.sweep import main  # noqa: E402

if __name__ == "__main__":
    run(main, prog="gpt2-sweep.py")
