"""Choosing the device the model runs on (the CLIs' ``--gpu`` flag)."""
from __future__ import annotations

import os
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


def nvidia_present() -> bool:
    """Whether the machine has an NVIDIA GPU driver loaded (whatever TensorFlow sees)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def unusable_gpu_message(index: int, found: int) -> str:
    """The one stderr line for a --gpu that TensorFlow cannot use."""
    prog = os.path.basename(sys.argv[0]) or "gpt2-japanese"
    if found == 0:
        why = ("TensorFlow finds no GPU (on Linux plain `tensorflow` has no CUDA: "
               "pip install 'tensorflow[and-cuda]'; --gpu -1 silences this)")
    else:
        why = f"TensorFlow finds {found} GPU(s), numbered 0 to {found - 1}"
    return f"{prog}: warning: GPU {index} (--gpu) cannot be used: {why}; running on the CPU"


def say_cpu(index: int, found: int, verbose: bool = False) -> None:
    """What ``--gpu index`` running on the CPU tells stderr, ``found`` GPUs being usable: one warning
    line for a GPU that exists (or was named on purpose, index > 0) but cannot be used, a note with
    ``verbose`` for the default --gpu 0 on a machine without one, nothing for --gpu -1."""
    if index >= 0 and (found or index > 0 or nvidia_present()):
        print(unusable_gpu_message(index, found), file=sys.stderr)
    elif index >= 0 and verbose:
        print(f"note: GPU {index} not available ({found} found); running on the CPU", file=sys.stderr)


def select_device(gpu: str | int | None = "0", verbose: bool = False) -> str:
    """Map a ``--gpu`` value to a TensorFlow device string and prepare TF for it.

    ``'-1'`` (or any negative number, or ``''``/``None``) means CPU: every GPU
    is hidden from TensorFlow, which must happen before TF runs its first op
    (call this before ``model.load``).  ``'N'`` gives ``'/GPU:N'`` when that GPU
    exists, otherwise ``'/CPU:0'`` -- with one warning line on stderr when the
    machine has an NVIDIA GPU (or TensorFlow sees GPUs, or N > 0) that TensorFlow
    cannot use as asked, and a note when ``verbose`` otherwise.
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
        say_cpu(index, len(gpus), verbose)
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
