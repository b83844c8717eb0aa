"""Encoder speed: characters/s and tokens/s, line by line.

    python bench/bench_encoder.py [--text FILE] [--vocab DIR] [--repeat N]

The reference figures use --text ../shared/corpus/ja-man.txt (the default,
the synthetic golden texts, is far denser in emoji and byte tokens).

Encodes the corpus line by line (and as one string), and, as the bound of
comparison measured in the same run, a straightforward re-implementation of
the original algorithm (every emoji key tested on every call, character by
character matching) on the first lines.  The target is 10x the original's
170 k characters/s line by line on this machine kind.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import encoder  # noqa: E402
from texts import add_text_flag, read_texts  # noqa: E402


def naive_encode(enc, text):
    """The original's algorithm, written plainly: the reference speed."""
    for a, b in ((" ", "<SP>"), ("\u3000", "<SP>"), ("\r\n", "<BR>"), ("\n", "<BR>"), ("\r", "<BR>"),
                 ("\t", "<TAB>"), ("\u2014", "\u30fc"), ("\u2212", "\u30fc")):
        text = text.replace(a, b)
    for key, token in enc.emoji.items():
        if key in text:
            text = text.replace(key, token)
    return enc._match_general(text)


def best_rate(fn, lines, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        n_tokens = fn(lines)
        best = min(best, time.perf_counter() - start)
    chars = sum(map(len, lines))
    return chars / best, n_tokens / best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_flag(p)
    p.add_argument("--vocab", default=None, help="vocabulary directory (default: encoder/)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--naive-lines", type=int, default=2000)
    args = p.parse_args()

    enc = encoder.load(args.vocab)
    lines = read_texts(args.text)

    def by_line(ls):
        return sum(len(enc.encode(line)) for line in ls)

    def whole(ls):
        return len(enc.encode("\n".join(ls)))

    def naive(ls):
        return sum(len(naive_encode(enc, line)) for line in ls)

    c_line, t_line = best_rate(by_line, lines, args.repeat)
    c_whole, t_whole = best_rate(whole, lines, args.repeat)
    sample = lines[: args.naive_lines]
    c_naive, _ = best_rate(naive, sample, 1)
    c_sample, _ = best_rate(by_line, sample, args.repeat)
    print(f"corpus: {len(lines)} lines, {sum(map(len, lines))} characters")
    print(f"line by line : {c_line / 1e6:6.2f} M chars/s  {t_line / 1e6:6.2f} M tokens/s")
    print(f"one string   : {c_whole / 1e6:6.2f} M chars/s  {t_whole / 1e6:6.2f} M tokens/s")
    print(f"original algorithm, first {len(sample)} lines: {c_naive / 1e3:7.1f} k chars/s; "
          f"this encoder on the same lines: {c_sample / 1e3:7.1f} k chars/s "
          f"(x{c_sample / c_naive:.1f})")
    print(f"target 1.7 M chars/s line by line (10x the original's 170 k): "
          f"{'met' if c_line >= 1.7e6 else 'NOT met'} (x{c_line / 170e3:.1f})")


if __name__ == "__main__":
    main()
