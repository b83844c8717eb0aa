"""Flags, model/vocabulary resolution and output handling shared by the tools.

Nothing here imports TensorFlow at module level, so ``--help`` stays fast;
``load_model`` imports it when a tool really needs the model.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from util.files import atomic_file, check_writable

from .errors import UsageError

DEFAULT_MODEL = "gpt2ja-medium"


def add_model_flags(p: argparse.ArgumentParser, gpu_default: str = "0") -> None:
    """--model, --vocab, --gpu, --verbose, --no-download: the flags every model tool has."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model directory (an unpacked gpt2ja-*.tar.bz2), or a released model name "
                        "(gpt2ja-small, gpt2ja-medium, gpt2ja-large), downloaded into $GPT2JA_HOME "
                        "(default ~/.cache/gpt2-japanese) on first use; default %(default)s")
    p.add_argument("--vocab", metavar="DIR", default=None,
                   help="directory with another ja-bpe.txt and emoji.json (default: $GPT2JA_VOCAB, "
                        "else the vocabulary of the released models, which ships in encoder/)")
    p.add_argument("--gpu", default=gpu_default,
                   help="GPU device id, or -1 for the CPU; without that GPU the CPU is used "
                        "(default %(default)s)")
    p.add_argument("--verbose", action="store_true",
                   help="log what happens (device, timings, TensorFlow's own messages) on stderr")
    p.add_argument("--no-download", dest="no_download", action="store_true",
                   help="never use the network (as GPT2JA_OFFLINE=1): a released model that is "
                        "not in the cache is an error saying what to download and where to put it")


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "must be at least 1")
non_negative_int = _int_at_least(0, "must not be negative")


def log(args, message: str) -> None:
    if getattr(args, "verbose", False):
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def warn(message: str) -> None:
    """One warning line on stderr, prefixed with the tool's name."""
    prog = os.path.basename(sys.argv[0]) or "gpt2-japanese"
    sys.stderr.write(f"{prog}: warning: {message}\n")
    sys.stderr.flush()


def quiet_tensorflow(verbose: bool) -> None:
    """TensorFlow's C++ and Python log lines go away unless --verbose."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def _may_download(args) -> bool:
    return not getattr(args, "no_download", False)


def load_encoder(args):
    """The encoder from --vocab, else $GPT2JA_VOCAB, else the vocabulary that
    ships in the encoder package (``encoder.find_vocab``)."""
    import encoder

    return encoder.load(args.vocab)


def load_model(args, enc=None):
    """Select the device (--gpu), load --model (a directory, or a released
    name resolved to the cache and downloaded when missing), check it against
    the vocabulary."""
    import hub

    quiet_tensorflow(args.verbose)
    model_dir = hub.resolve_model(args.model, download=_may_download(args))
    import model

    device = model.select_device(str(args.gpu), verbose=args.verbose)
    log(args, f"device: {device}")
    m = model.load(str(model_dir), device=device)
    if enc is not None:
        model.check_vocab(m.hparams, len(enc))
    return m


def read_stdin_text() -> str:
    """All of stdin as text (strict UTF-8), or a UsageError."""
    try:
        data = sys.stdin.buffer.read()
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"cannot read standard input: {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"standard input is not UTF-8 (invalid byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_lines(path: str):
    """(line number, text) for each line of a file or '-' (stdin), strict
    UTF-8, line terminators removed; read lazily so pipelines stream."""
    if path == "-":
        stream = sys.stdin.buffer
        name = "standard input"
    else:
        try:
            stream = open(path, "rb")
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
        name = path
    try:
        for number, raw in enumerate(stream, 1):
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{name}, line {number}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror or e}") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def lines_per_batch(path: str, default: int) -> int:
    """How many input lines to gather before computing: one at a time when a
    person types them (stdin is a terminal), else ``default``."""
    if path == "-":
        try:
            if sys.stdin.isatty():
                return 1
        except (AttributeError, ValueError):
            pass
    return default


@contextlib.contextmanager
def output(path: str, binary: bool = False):
    """stdout, or ``path`` written atomically when a path is given (``util.files``:
    a regular file is replaced only when everything was written; a device or
    FIFO is written directly; a symlink's target is replaced)."""
    if not path:
        yield sys.stdout.buffer if binary else sys.stdout
        return
    try:
        check_writable(path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with atomic_file(path, "wb" if binary else "w") as f:
            yield f
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None



def progress(iterable=None, total=None, desc=None, unit="it", force=False):
    """A tqdm bar on stderr, shown only when stderr is a terminal (or forced)."""
    from tqdm import tqdm

    disable = not (force or sys.stderr.isatty())
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, leave=False)
