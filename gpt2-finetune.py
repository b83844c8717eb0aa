#!/usr/bin/env python3
"""Fine-tune a gpt2ja model on your own text.  See --help and README.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli.finetune import main  # noqa: E402
from cli.errors import run  # noqa: E402

if __name__ == "__main__":
    run(main, prog="gpt2-finetune.py")
