"""Starting fast: the checkpoint read without TensorFlow (model.bundle, model.arrays) and the ONNX
step graph kept once built (model.ortdecode.graph_for), with what must not change: the numbers, the
checks TensorFlow's reader makes, and nothing trusted that changed since."""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

import model
from model import arrays, bundle, ortdecode
from model.checkpoint import CheckpointReader

GENERATE = str(ROOT / "gpt2-generate.py")


def _copy(src, dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    return dst


@pytest.fixture
def ckpt(tiny_model_dir, tmp_path):
    return _copy(tiny_model_dir, tmp_path / "m")


# ------------------------------------------------------------------------------ the reader

def test_the_bundle_reader_gives_what_tensorflow_reads(tiny_model_dir, tmp_path):
    prefix = model.find_checkpoint(tiny_model_dir)
    tf_reader = CheckpointReader(prefix)
    b = bundle.open_bundle(prefix)
    assert b.shapes == tf_reader.shapes
    for name in b.shapes:
        a = b.array(name)
        assert a.dtype == np.float32 and not a.flags.writeable
        np.testing.assert_array_equal(a, tf_reader.get(name))
    # and a checkpoint written by this project's own writer (other shapes, other step)
    hp = model.HParams(n_vocab=60, n_ctx=16, n_embd=32, n_head=4, n_layer=2)
    w = model.random_weights(hp, seed=3, numpy=True)
    model.save(w, tmp_path / "r", step=5, hparams=hp)
    b = bundle.open_bundle(tmp_path / "r" / "model-5")
    for name, value in w.items():
        np.testing.assert_array_equal(b.array(name).reshape(np.shape(value)), value)


@pytest.mark.parametrize("damage", ["garbage", "short", "compressed"])
def test_an_index_the_reader_cannot_take_is_a_bundle_error(damage, ckpt):
    index = ckpt / "model-1000.index"
    raw = bytearray(index.read_bytes())
    if damage == "garbage":
        raw = bytearray(b"not an index" * 20)
    elif damage == "short":
        raw = raw[-20:]
    else:  # the footer's index handle -> that block's trailer: mark it snappy-compressed
        pos = 0
        footer = bytes(raw[-48:])
        for _ in range(2):
            _, pos = bundle._varint(footer, pos)
        offset, pos = bundle._varint(footer, pos)
        size, _ = bundle._varint(footer, pos)
        raw[offset + size] = 1
    index.write_bytes(bytes(raw))
    with pytest.raises(bundle.BundleError):
        bundle.open_bundle(ckpt / "model-1000")


def test_a_truncated_data_file_is_a_bundle_error(ckpt):
    data = ckpt / "model-1000.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    b = bundle.open_bundle(ckpt / "model-1000")
    last = max(b.entries, key=lambda n: b.entries[n].offset)
    with pytest.raises(bundle.BundleError, match="beyond the end"):
        b.array(last)


def test_varints_and_fields():
    assert bundle._varint(bytes([0x96, 0x01]), 0) == (150, 2)
    with pytest.raises(bundle.BundleError):
        bundle._varint(bytes([0x80]), 0)
    # field 1 varint 8, field 2 bytes "ab", field 6 fixed32
    msg = bytes([0x08, 0x08, 0x12, 0x02]) + b"ab" + bytes([0x35]) + struct.pack("<I", 7)
    assert bundle._fields(msg) == [(1, 0, 8), (2, 2, b"ab"), (6, 5, 7)]


# ------------------------------------------------------------------------------ trusting a checkpoint

def test_only_a_checkpoint_tensorflow_has_read_is_memory_mapped(ckpt, tiny):
    assert arrays.load_arrays(ckpt) is None  # never read whole by TensorFlow: not trusted
    first = arrays.load_for_decoding(ckpt)
    assert isinstance(first, model.Model)
    second = arrays.load_for_decoding(ckpt)
    assert isinstance(second, arrays.ArrayModel) and second.hparams == tiny.hparams
    for name, var in tiny.variables.items():
        np.testing.assert_array_equal(second.variables[name], var.numpy())
    # touched (same bytes): the stamps changed, so TensorFlow reads it again, then it is trusted again
    data = ckpt / "model-1000.data-00000-of-00001"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert arrays.load_arrays(ckpt) is None
    assert isinstance(arrays.load_for_decoding(ckpt), model.Model)
    assert isinstance(arrays.load_for_decoding(ckpt), arrays.ArrayModel)
    assert not (ckpt / "quantized").exists()  # nothing written into the model's directory
    # a copy (same bytes, same times) is another file: not trusted until TensorFlow has read it
    other = ckpt.parent / "copy"
    shutil.copytree(ckpt, other, copy_function=shutil.copy2)
    assert arrays.load_arrays(other) is None


def test_a_corrupted_checkpoint_is_caught_the_first_time(ckpt):
    data = ckpt / "model-1000.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100:200] = bytes(100)
    data.write_bytes(bytes(raw))
    with pytest.raises(model.ModelError, match="model-1000"):
        arrays.load_for_decoding(ckpt)  # TensorFlow's reader checks the CRC32C ...
    assert arrays.load_arrays(ckpt) is None  # ... and nothing was recorded as trusted


def test_a_record_planted_as_a_link_is_not_followed(ckpt, tmp_path):
    prefix = str(ckpt / "model-1000")
    key = model.quantize.checkpoint_key(prefix, arrays.FORMAT)
    path = arrays._record_path(prefix, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(arrays._record(key, prefix), sort_keys=True))
    path.symlink_to(target)
    assert not arrays.trusted(prefix)
    arrays.remember(prefix)  # replaces the link, never writes through it
    assert not path.is_symlink() and arrays.trusted(prefix)
    assert target.read_text() == json.dumps(arrays._record(key, prefix), sort_keys=True)


@pytest.mark.parametrize("engine", ["numpy", "onnx"])
def test_memory_mapped_weights_decode_exactly_like_loaded_ones(engine, ckpt, tiny):
    arrays.load_for_decoding(ckpt)
    mapped = arrays.load_for_decoding(ckpt)
    assert isinstance(mapped, arrays.ArrayModel)
    a, b = model.decoder(tiny, engine=engine), model.decoder(mapped, engine=engine)
    ctx = [[5, 6, 7, 8], [9, 10]]
    np.testing.assert_array_equal(a.add([0, 1], ctx), b.add([0, 1], ctx))
    np.testing.assert_array_equal(a.step([0, 1], [11, 12]), b.step([0, 1], [11, 12]))
    with pytest.raises(ValueError, match="no TensorFlow weights"):
        model.decoder(mapped, engine="tf")


_PROBE = r"""
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("modules:", " ".join(m for m in ("tensorflow", "onnx") if m in sys.modules), file=sys.stderr)
"""


def _generate(args, env):
    p = subprocess.run([sys.executable, "-c", _PROBE, GENERATE, *args], capture_output=True, env=env, cwd=ROOT,
                       timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 0, err
    return p.stdout.decode(), err


def test_the_second_run_imports_neither_tensorflow_nor_onnx(ckpt, env, tmp_path):
    env = {**env, "GPT2JA_HOME": str(tmp_path / "home")}
    args = ["--model", str(ckpt), "--num_generate", "3", "--max_length", "12", "--top_k", "5", "--seed", "2",
            "--context", "今日は", "--verbose"]
    out1, err1 = _generate(args, env)
    assert "tensorflow" in err1.splitlines()[-1] and "without TensorFlow" not in err1
    out2, err2 = _generate(args, env)
    assert out2 == out1
    assert err2.splitlines()[-1].strip() == "modules:", err2  # neither imported
    assert "(memory-mapped, without TensorFlow)" in err2
    # --engine tf, and --gpu naming a GPU, still go through TensorFlow and say what they always said
    out3, err3 = _generate(args + ["--engine", "tf"], env)
    assert "tensorflow" in err3.splitlines()[-1]
    _, err4 = _generate(args + ["--gpu", "2"], env)
    assert "warning: GPU 2 (--gpu) cannot be used" in err4


def test_the_kept_graph_is_checked_and_rebuilt(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2JA_HOME", str(tmp_path))
    w = {k: v.numpy() for k, v in tiny.variables.items()}
    graph, names = ortdecode.graph_for(tiny.hparams, w)
    kept = list((tmp_path / "quantized" / "graphs").iterdir())
    assert len(kept) == 1 and set(names) == set(w) - {"model/wpe"}  # positions are added outside the graph
    assert ortdecode.graph_for(tiny.hparams, w) == (graph, names)  # read back
    raw = bytearray(kept[0].read_bytes())
    raw[-10] ^= 0xFF  # damaged: fails its checksum, is rebuilt and written again
    kept[0].write_bytes(bytes(raw))
    assert ortdecode._read_graph(kept[0]) is None
    assert ortdecode.graph_for(tiny.hparams, w) == (graph, names)
    assert ortdecode._read_graph(kept[0]) == (graph, names)
    # other shapes, another graph
    hp = model.HParams(n_vocab=60, n_ctx=16, n_embd=32, n_head=4, n_layer=2)
    w2 = model.random_weights(hp, seed=1, numpy=True)
    w2 = {k: (v[0] if k.endswith("/w") else v) for k, v in w2.items()}
    ortdecode.graph_for(hp, w2)
    assert len(list((tmp_path / "quantized" / "graphs").iterdir())) == 2


def test_an_unwritable_cache_still_decodes(tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("GPT2JA_HOME", str(blocker / "home"))  # under a file: nothing can be written
    dec = model.decoder(tiny, engine="onnx")
    ref = model.decoder(tiny, engine="numpy")
    np.testing.assert_allclose(dec.add([0], [[1, 2, 3]]), ref.add([0], [[1, 2, 3]]), atol=1e-4)
