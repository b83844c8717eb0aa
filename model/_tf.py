"""Import TensorFlow quietly.

TensorFlow's C++ side prints start-up chatter ("oneDNN custom operations are
on", "All log messages before absl::InitializeLog()...") straight to file
descriptor 2 while it is imported, before any logging setting applies.
``import_tf`` sets ``TF_CPP_MIN_LOG_LEVEL=2`` (unless already set), captures
descriptor 2 during the import, and passes on whatever is not known chatter,
so real errors still reach the user.  Nothing is ever written to stdout.
"""
from __future__ import annotations

import os
import sys
import tempfile

_NOISE = (
    "All log messages before absl::InitializeLog",
    "oneDNN custom operations are on",
    "cpu_feature_guard",
    "This TensorFlow binary is optimized",
    "To enable the following instructions",
    "rebuild TensorFlow with the appropriate compiler flags",
    "Could not find cuda drivers",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning",
    "failed call to cuInit",
)


def _is_noise(line: str) -> bool:
    return not line.strip() or any(marker in line for marker in _NOISE)


def import_tf():
    """Return the ``tensorflow`` module, importing it quietly the first time."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "function"):
        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):  # no usable fd 2: import plainly
        import tensorflow as tf
        return tf
    captured = tempfile.TemporaryFile()
    try:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    finally:
        captured.seek(0)
        text = captured.read().decode("utf-8", "replace")
        captured.close()
        rest = [line for line in text.splitlines() if not _is_noise(line)]
        if rest:
            sys.stderr.write("\n".join(rest) + "\n")
            sys.stderr.flush()
    return tf
