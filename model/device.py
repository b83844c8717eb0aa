"""Choosing the device the model runs on (the CLIs' ``--gpu`` flag)."""
from __future__ import annotations

import sys

CPU = "/CPU:0"


def parse_gpu(gpu: str | int | None) -> int:
    """A ``--gpu`` value as a number (negative, ``''`` and None: -1, the CPU); ModelError when it is
    not a number.  Imports nothing."""
    text = "" if gpu is None else str(gpu).strip()
    try:
        return int(text) if text else -1
    except ValueError:
        from .errors import ModelError
        raise ModelError(f"--gpu must be a GPU number or -1 for the CPU, got {gpu!r}") from None


def select_device(gpu: str | int | None = "0", verbose: bool = False) -> str:
    """Map a ``--gpu`` value to a TensorFlow device string and prepare TF for it.

    ``'-1'`` (or any negative number, or ``''``/``None``) means CPU: every GPU
    is hidden from TensorFlow, which must happen before TF runs its first op
    (call this before ``model.load``).  ``'N'`` gives ``'/GPU:N'`` when that GPU
    exists, otherwise ``'/CPU:0'`` -- with a note on stderr when ``verbose``.
    Pass the result to ``model.load(dir, device=...)``.
    """
    index = parse_gpu(gpu)
    from ._tf import import_tf
    tf = import_tf()
    try:
        gpus = tf.config.list_physical_devices("GPU")
    except Exception:  # a broken CUDA set-up must not stop CPU use
        gpus = []
    if index < 0 or index >= len(gpus):
        if index >= 0 and verbose:
            print(f"note: GPU {index} not available ({len(gpus)} found); running on the CPU", file=sys.stderr)
        if gpus:
            try:
                tf.config.set_visible_devices([], "GPU")
            except (RuntimeError, ValueError):
                # TF is already initialised: GPUs stay visible, but we still place ops on the CPU.
                pass
        return CPU
    try:  # share the GPU politely: allocate memory as needed, not all of it up front
        tf.config.experimental.set_memory_growth(gpus[index], True)
    except (RuntimeError, ValueError):
        pass
    return f"/GPU:{index}"
