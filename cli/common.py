"""Loading the encoder and the model for a tool, and its stderr messages.

Nothing here imports TensorFlow at module level, so ``--help`` stays fast;
``load_model`` imports it when a tool really needs the model.
"""
from __future__ import annotations

import os
import sys


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
