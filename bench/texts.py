"""The text the benchmarks read: a file given with --text, else texts inside the repository.

    from texts import add_text_flag, read_texts
    add_text_flag(parser)                  # --text FILE
    lines = read_texts(args.text, limit=1000)

Default: the 3,258 texts of ``tests/data/golden/encode.jsonl`` (synthetic
Japanese written for this project).  A plain text file gives one text per
line; a ``.jsonl`` file its records' ``text`` fields.  For figures comparable
with the reference measurements, pass the man-page corpus read in place:
``--text ../shared/corpus/ja-man.txt`` (third-party prose, never copied into
the repository).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT / "tests" / "data" / "golden" / "encode.jsonl"


def add_text_flag(parser) -> None:
    parser.add_argument("--text", metavar="FILE", default=str(DEFAULT_TEXT),
                        help="texts to use, one per line (or a .jsonl with 'text' fields); default: the "
                             "repository's synthetic golden texts; ../shared/corpus/ja-man.txt for the "
                             "reference figures")


def read_texts(path: str, limit: Optional[int] = None) -> List[str]:
    """Up to ``limit`` texts of ``path``, each on one line (line breaks inside jsonl texts become spaces)."""
    out: List[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            if path.endswith(".jsonl"):
                text = " ".join(json.loads(line)["text"].splitlines())
            else:
                text = line.rstrip("\n")
            out.append(text)
    return out
