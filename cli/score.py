"""gpt2-score.py: log-probabilities of sentences under a gpt2ja model."""
from __future__ import annotations

import argparse
import json
import math

from . import common, flags, io
from .errors import ArgumentParser, UsageError

CHUNK_LINES = 512  # lines read, batched and written at a time


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2-score.py",
        description="Score each line of a text with a Japanese GPT-2 model: the sum of its tokens' natural-log "
                    "probabilities, with <|endoftext|> before the tokens (and after them unless --exclude-end).",
        epilog="Example: printf '現在も行方不明のまま。\\n現在も行方不明のママ。\\n' | "
               "python gpt2-score.py --model gpt2ja-small --exclude-end -",
    )
    p.add_argument("input_file", metavar="INPUT_FILE",
                   help="one text per line ('-' for stdin); lines are stripped, empty lines skipped")
    flags.add_model_flags(p)
    flags.add(p, "tokens", "exclude_end", "stride", "batch_tokens", "output_file", "precision")
    p.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help='text (default, the original\'s): "text<TAB>logprob" per line; jsonl: '
                        '{"text", "logprob", "tokens", "perplexity"} per line')
    return p


def _float32_value(x) -> float:
    """The shortest decimal that gives this float32 back, as a Python float (for JSON)."""
    import numpy as np

    return float(str(np.float32(x)))


def render_text(score, enc, tokens: bool) -> str:
    """The original's lines: ``text<TAB>%.5g``, then with --tokens every token's line and an empty line."""
    lines = ["%s\t%.5g" % (score.text, score.logprob)]
    if tokens:
        lines += ["%s\t%.5g" % (enc.decode([t]), lp) for t, lp in zip(score.ids, score.logprobs.tolist())]
        lines.append("")
    return "\n".join(lines) + "\n"


def render_jsonl(score, enc, tokens: bool) -> str:
    ppl = score.perplexity
    record = {"text": score.text, "logprob": score.logprob, "tokens": len(score.ids),
              "perplexity": ppl if math.isfinite(ppl) else None}
    if tokens:
        record["token_logprobs"] = [{"id": int(t), "token": enc.decode([t]), "logprob": _float32_value(lp)}
                                    for t, lp in zip(score.ids, score.logprobs.tolist())]
    return json.dumps(record, ensure_ascii=False) + "\n"


def _texts(path: str):
    """(line number, stripped text) of each non-empty line.  As the original (Python's
    universal newlines), a lone carriage return also ends a line."""
    for number, line in io.read_lines(path):
        for part in line.split("\r"):
            text = part.strip()
            if text:
                yield number, text


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.input_file != "-":  # fail before the slow model loading
        try:
            open(args.input_file, "rb").close()
        except OSError as e:
            raise UsageError(f"cannot read {args.input_file}: {e.strerror or e}") from None
    enc = common.load_encoder(args)
    m = common.load_model(args, enc)
    from tasks.score import Scorer, TextScore

    scorer = Scorer(m, enc, exclude_end=args.exclude_end, stride=args.stride, max_tokens=args.batch_tokens,
                    precision=args.precision)
    m = scorer.model  # with --precision bf16 its copy: the float32 model is dropped
    flags.use_precision(m)
    render = render_jsonl if args.format == "jsonl" else render_text

    import time

    t0 = time.perf_counter()
    with io.output(args.output_file) as out:
        bar = io.progress(desc="scored", unit="line")
        writer = io.Writer(out, lambda score: render(score, enc, args.tokens), bar=bar)
        try:
            for chunk in io.chunks(_texts(args.input_file), io.lines_per_batch(args.input_file, CHUNK_LINES)):
                id_lists = [scorer.ids(text) for _, text in chunk]
                for i, logprobs in scorer.score_token_lists(id_lists):
                    writer.write(TextScore(chunk[i][1], id_lists[i], logprobs))
                    bar.update(1)
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    common.report_end(args, f"scored: {writer.count} lines in {seconds:.2f} s "
                            f"({writer.count / max(seconds, 1e-9):.1f} lines/s)")
    return 0
