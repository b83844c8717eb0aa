"""gpt2-score.py: log-probabilities of sentences under a gpt2ja model."""
from __future__ import annotations

import argparse
import json
import math

from . import common
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
    common.add_model_flags(p)
    p.add_argument("--tokens", action="store_true",
                   help="also print every token with its log-probability (text: one 'token<TAB>logprob' line "
                        "each, then an empty line; jsonl: a token_logprobs list)")
    p.add_argument("--exclude-end", action="store_true",
                   help="do not score <|endoftext|> after the text")
    p.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help='text (default, the original\'s): "text<TAB>logprob" per line; jsonl: '
                        '{"text", "logprob", "tokens", "perplexity"} per line')
    p.add_argument("--stride", type=common.positive_int, default=None,
                   help="for texts longer than the model's context (n_ctx tokens): windows of n_ctx tokens "
                        "start every STRIDE tokens, so each token is predicted from at least n_ctx - STRIDE "
                        "tokens before it (default n_ctx/2 = 512; at most n_ctx - 1)")
    p.add_argument("--batch_tokens", type=common.positive_int, default=2048,
                   help="padded tokens per batch (default 2048)")
    p.add_argument("--output_file", default="", help="write to this file instead of stdout "
                   "(written atomically: a failed run leaves no partial file)")
    return p


def _float32_value(x) -> float:
    """The shortest decimal that gives this float32 back, as a Python float (for JSON)."""
    import numpy as np

    return float(str(np.float32(x)))


class _Writer:
    def __init__(self, out, fmt: str, tokens: bool, enc):
        self.out = out
        self.fmt = fmt
        self.tokens = tokens
        self.enc = enc

    def write(self, score) -> None:
        total = score.logprob
        values = score.logprobs.tolist()
        if self.fmt == "text":
            lines = ["%s\t%.5g" % (score.text, total)]
            if self.tokens:
                lines += ["%s\t%.5g" % (self.enc.decode([t]), lp) for t, lp in zip(score.ids, values)]
                lines.append("")
            self.out.write("\n".join(lines) + "\n")
            return
        ppl = score.perplexity
        record = {"text": score.text, "logprob": total, "tokens": len(score.ids),
                  "perplexity": ppl if math.isfinite(ppl) else None}
        if self.tokens:
            record["token_logprobs"] = [{"id": int(t), "token": self.enc.decode([t]), "logprob": _float32_value(lp)}
                                        for t, lp in zip(score.ids, values)]
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self.out.flush()


def _texts(path: str):
    """(line number, stripped text) of each non-empty line.  As the original (Python's
    universal newlines), a lone carriage return also ends a line."""
    for number, line in common.read_lines(path):
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
    n_ctx = m.hparams.n_ctx
    if args.stride is not None and args.stride >= n_ctx:
        raise UsageError(f"--stride must be below the model's context of {n_ctx} tokens, got {args.stride}")
    from tasks.score import Scorer, TextScore

    scorer = Scorer(m, enc, exclude_end=args.exclude_end, stride=args.stride, max_tokens=args.batch_tokens)

    def process(chunk, writer, bar):
        id_lists = [scorer.ids(text) for _, text in chunk]
        for i, logprobs in scorer.score_token_lists(id_lists):
            writer.write(TextScore(chunk[i][1], id_lists[i], logprobs))
            writer.flush()
            bar.update(1)

    def run(out):
        writer = _Writer(out, args.format, args.tokens, enc)
        bar = common.progress(desc="scored", unit="line")
        chunk = []
        per_batch = common.lines_per_batch(args.input_file, CHUNK_LINES)
        try:
            try:
                for item in _texts(args.input_file):
                    chunk.append(item)
                    if len(chunk) >= per_batch:
                        process(chunk, writer, bar)
                        chunk = []
            except UsageError:
                if chunk:
                    process(chunk, writer, bar)  # every line read before the error is written
                raise
            if chunk:
                process(chunk, writer, bar)
        finally:
            bar.close()

    with common.output(args.output_file) as out:
        run(out)
    return 0
