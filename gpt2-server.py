#!/usr/bin/env python3
"""Serve a gpt2ja model over HTTP (OpenAI-compatible API and a demonstration page).  See --help and README.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli.errors import run  # noqa: E402
from cli.server import main  # noqa: E402

if __name__ == "__main__":
    run(main, prog="gpt2-server.py")
