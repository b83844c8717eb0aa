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


def _decodes_on_the_cpu(args, engine) -> bool:
    """Whether this run decodes float32 weights on the CPU with numpy or ONNX Runtime (so needs no
    TensorFlow once the checkpoint is trusted): --engine auto/numpy/onnx, no --lora, float32, and
    --gpu -1 or no NVIDIA driver at all (a GPU that may be usable goes through TensorFlow)."""
    import model
    from model import device

    if engine not in ("auto", "numpy", "onnx") or getattr(args, "lora", None) is not None:
        return False
    if getattr(args, "precision", "fp32") != "fp32":
        return False
    return model.parse_gpu(args.gpu) < 0 or not device.nvidia_present()


def load_model(args, enc=None, quantize=None, engine=None):
    """Set the threads (--threads), select the device (--gpu), load --model (a
    directory, or a released name resolved to the cache and downloaded when
    missing), check it against the vocabulary.  With --verbose, say how long
    loading took.

    ``quantize`` ('q8' or 'q4'): a model to decode with those weights only
    (``model.load_quantized``): read from the cache file without TensorFlow
    (which is loaded only to quantize the checkpoint the first time); it runs
    on the CPU whatever --gpu says.

    ``engine`` (gpt2-generate.py's --engine): when it decodes float32 weights on the CPU, the
    checkpoint is memory-mapped without TensorFlow once TensorFlow has read it whole
    (``model.load_for_decoding``)."""
    import time

    import hub

    quiet_tensorflow(args.verbose)
    model_dir = hub.resolve_model(args.model, download=_may_download(args))
    import model

    t0 = time.perf_counter()
    lora = getattr(args, "lora", None)
    if quantize is not None:
        if lora is not None:
            from .errors import UsageError
            raise UsageError(f"--lora cannot be combined with --quantize {quantize}: merge the adapter first "
                             f"(python -m model merge BASE ADAPTER OUT) and quantize OUT")
        threads = model.configure_threads(getattr(args, "threads", None), tensorflow=False)
        if model.parse_gpu(args.gpu) >= 0:
            log(args, f"note: {quantize} weights decode on the CPU (ONNX Runtime), not on GPU {args.gpu}")
        m = model.load_quantized(str(model_dir), quantize)
        where = "the CPU"
    elif _decodes_on_the_cpu(args, engine):
        threads = model.configure_threads(getattr(args, "threads", None), tensorflow=False)
        from model import device
        device.say_cpu(model.parse_gpu(args.gpu), 0, verbose=args.verbose)  # no NVIDIA driver here
        m = model.load_for_decoding(str(model_dir))
        where = "the CPU" + ("" if hasattr(m, "start") else " (memory-mapped, without TensorFlow)")
    else:
        threads = model.configure_threads(getattr(args, "threads", None))
        where = model.select_device(str(args.gpu), verbose=args.verbose)
        from .flags import settle_precision
        settle_precision(args, where)  # bf16 only where it is not emulated
        # --precision bf16 (gpt2-transform.py, gpt2-score.py): the block matrices are read as bfloat16,
        # so the float32 ones are never all in memory
        m = model.load(str(model_dir), device=where, precision=getattr(args, "precision", "fp32"), lora=lora)
    if enc is not None:
        model.check_vocab(m.hparams, len(enc))
    log(args, f"model: {m.path} on {where}, {threads} thread(s); loaded in {time.perf_counter() - t0:.2f} s")
    return m


def report_end(args, *lines: str) -> None:
    """With --verbose: the given timing lines and the peak memory, at the end of a run."""
    if not getattr(args, "verbose", False):
        return
    import resource

    for line in lines:
        log(args, line)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    log(args, f"peak memory: {peak / 2 ** 30:.2f} GiB")
