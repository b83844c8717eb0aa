"""GPT-2 for the released Japanese checkpoints (gpt2ja-small/medium/large).

    import model
    m = model.load("gpt2ja-small")        # Model; m.hparams.n_vocab, ...
    m.check_vocab_size(len(encoder))      # ModelError on a mismatch
    logits = m.logits([[1, 2, 3]])        # float32 [batch, T, n_vocab]
    h = m.hidden([[1, 2, 3]])             # float32 [batch, T, n_embd] (after ln_f)
    h5 = m.hidden([[1, 2, 3]], layer=5)   # residual stream after block 5 (0-based)
    cache, last = m.start([[1, 2, 3], [4, 5]], max_len=128)  # KV-cache prefill of a
                                          # ragged batch: last = logits [2, n_vocab]
    nxt = m.step(cache, [42, 7])          # one decoding step per row -> [2, n_vocab]
    dec = model.decoder(m)                # sequences decoded token by token (model.rows: by id;
    first = dec.add([0, 1], [[1, 2, 3], [4, 5]])  # the engine: model.decoding.choose_engine)
    nxt = dec.step([0, 1], [42, 7])
    dec = model.decoder(m, quantize="q4") # OnnxDecoder (ONNX Runtime) over 4-bit weights,
                                          # made once and cached (model.quantize)
    qm = model.load_quantized(dir, "q4")  # the same weights from the cache alone: no
    dec = model.decoder(qm)               # TensorFlow, no float32 weights in memory
    fm = model.load_for_decoding(dir)     # float32 for CPU decoding, memory-mapped without
                                          # TensorFlow once TensorFlow has read it (model.arrays)
    arr, lens = model.as_batch([[1, 2], [3]], m.hparams)  # checked, right-padded int32 batch
    model.save(m, "out_dir", step=1000)   # released layout, state file written last
    dev = model.select_device("-1")       # --gpu: '-1' CPU, 'N' -> '/GPU:N' if present
    m = model.load("gpt2ja-small", device=dev)
    m = model.load(dir, lora="checkpoint/run")  # a LoRA adapter merged into the weights (model.lora)
    b = model.load("gpt2ja-small", precision="bf16")  # block matrices in bfloat16 (or
                                          # m.with_precision("bf16")): half the memory, faster
                                          # batched forward passes where model.bf16_native()

Inside a task's own ``tf.function``: ``m.graph_hidden(ids)`` (final hidden
states as a tensor) and ``m.graph_logits(h)`` (the tied output projection).

``ModelError``, ``HParams``, ``check_vocab``, ``RELEASED``, ``LAYER_NAMES``,
``PRECISIONS`` and ``layer_weights`` come without importing TensorFlow (for fast ``--help``);
everything else is loaded on first use (module ``__getattr__``), importing
TensorFlow quietly then where it is needed.
"""
from ._tf import import_tf
from .errors import ModelError
from .hparams import LAYER_NAMES, RELEASED, HParams, check_vocab, layer_weights, variable_shapes

#: The weight formats of the forward pass (``load(..., precision=)``, ``Model.with_precision``).
PRECISIONS = ("fp32", "bf16")

_LAZY = {
    "load": "gpt2",
    "Model": "gpt2",
    "Cache": "gpt2",
    "bf16_native": "gpt2",
    "save": "checkpoint",
    "random_weights": "checkpoint",
    "find_checkpoint": "checkpoint",
    "open_checkpoint": "checkpoint",
    "select_device": "device",
    "parse_gpu": "device",
    "as_batch": "batch",
    "decoder": "decoding",
    "choose_engine": "decoding",
    "Decoder": "decoding",
    "NumpyDecoder": "npdecode",
    "TFDecoder": "tfdecode",
    "configure_threads": "threads",
    "cpu_count": "threads",
    "OnnxDecoder": "ortdecode",
    "quantize": "quantize",
    "lora": "lora",
    "load_quantized": "quantize",
    "QuantizedModel": "quantize",
    "load_for_decoding": "arrays",
    "ArrayModel": "arrays",
    "bundle": "bundle",
}

__all__ = ["ModelError", "import_tf", "HParams", "RELEASED", "check_vocab", "variable_shapes", "LAYER_NAMES",
           "layer_weights", "PRECISIONS", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    loaded = importlib.import_module(f"{__name__}.{module}")
    value = loaded if name == module else getattr(loaded, name)  # a module itself (quantize)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
