"""The onnx engine (model/ortdecode.py), 8-/4-bit weights (model/quantize.py) and --quantize."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import model
from cli import generate as cli_generate
from cli.download import main as model_main
from model import quantize
from model.npdecode import NumpyDecoder
from tasks.generate import GenerateOptions, Generator

from conftest import ROOT, TINY_DIR

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_copy(tmp_path_factory):
    """A writable copy of the tiny checkpoint (quantized weights are cached beside it)."""
    d = tmp_path_factory.mktemp("tiny") / "gpt2ja-tiny"
    shutil.copytree(TINY_DIR, d)
    return d


@pytest.fixture(scope="module")
def tiny_q(tiny_copy):
    return model.load(tiny_copy)


@pytest.fixture(scope="module")
def onnx32(tiny_q):
    return model.decoder(tiny_q, engine="onnx")


def _contexts(n, rng, low=1, high=40):
    return [list(rng.integers(0, 20573, int(rng.integers(low, high)))) for _ in range(n)]


# -- the engine for quantized weights ---------------------------------------


def test_onnx_decoder_is_the_chosen_engine(tiny_q, enc):
    assert model.choose_engine(tiny_q, "auto", "q8") == "onnx"
    assert model.choose_engine(tiny_q, "onnx") == "onnx"
    assert model.choose_engine(tiny_q) == "onnx"  # float32 ONNX Runtime: the default on a CPU
    with pytest.raises(ValueError, match="onnx engine"):
        model.choose_engine(tiny_q, "tf", "q4")
    with pytest.raises(ValueError, match="unknown weight format"):
        model.choose_engine(tiny_q, "auto", "q2")
    assert isinstance(Generator(tiny_q, enc, engine="numpy").engine(), NumpyDecoder)
    assert Generator(tiny_q, enc).engine().quantize is None
    gen = Generator(tiny_q, enc, "auto", None, "q8")
    assert gen.engine_name == "onnx" and gen.engine().quantize == "q8"


# -- quantized weights -------------------------------------------------------------------------


def test_quantize_matrix_round_trip():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (48, 70)).astype(np.float32)  # K = 70: padded to 3 blocks of 32
    for bits in (8, 4):
        q, s = quantize.quantize_matrix(w, bits)
        assert q.shape == (48, 3, 32 * bits // 8) and s.shape == (48 * 3,)
        back = quantize.dequantize_matrix(q, s, bits, 70)
        step = np.abs(np.repeat(s.reshape(48, 3), 32, axis=1)[:, :70])
        err = np.abs(back - w)
        assert np.all(err <= step + 1e-7)  # within a step (half a step unless clipped at +8 / +128)
        assert np.mean(err <= step / 2 + 1e-7) > 0.99
        extreme = np.abs(w.reshape(48, -1)).max(axis=1)  # each row's extreme is exact
        np.testing.assert_allclose(np.abs(back).max(axis=1), extreme, rtol=1e-6)
    assert quantize.relative_error(quantize.dequantize_matrix(*quantize.quantize_matrix(w, 8), 8, 70), w) < 0.01


def test_quantized_logits_close_to_float32(tiny_q, onnx32):
    """Measured on the tiny (random) checkpoint, 24 random contexts and 8 steps each: relative error
    of the logits q8 0.018, q4 0.22; top-1 agreement q8 0.97, q4 0.57.  (A random model's logits are
    nearly flat; bench/bench_quantize.py measures KL divergence and top-1 on a trained one.)"""
    rng = np.random.default_rng(5)
    seqs = _contexts(24, rng, 2, 60)
    steps = [rng.integers(0, 20573, len(seqs)) for _ in range(8)]

    def run(dec):
        dec.clear()
        ids = list(range(len(seqs)))
        out = [dec.add(ids, seqs)] + [dec.step(ids, t) for t in steps]
        return np.concatenate(out)

    ref = run(onnx32)
    np.testing.assert_allclose(ref, run(NumpyDecoder.from_model(tiny_q)), atol=ATOL)
    errors, top1 = {}, {}
    for fmt in ("q8", "q4"):
        got = run(model.decoder(tiny_q, quantize=fmt))
        errors[fmt] = quantize.relative_error(got, ref)
        top1[fmt] = float(np.mean(got.argmax(1) == ref.argmax(1)))
    assert errors["q8"] < 0.03, errors
    assert errors["q4"] < 0.35, errors
    assert errors["q8"] < errors["q4"] / 5
    assert top1["q8"] >= 0.85 and top1["q4"] >= 0.3, top1


def test_cache_made_once_and_reused(tiny_copy, tiny_q):
    shutil.rmtree(tiny_copy / "quantized", ignore_errors=True)
    first = model.decoder(tiny_q, quantize="q4")
    assert first.quantized_now
    path = first.quantized_path
    assert path.parent == tiny_copy / "quantized" and path.is_file()
    stamp = path.stat().st_mtime_ns
    second = model.decoder(tiny_q, quantize="q4")
    assert not second.quantized_now and second.quantized_path == path
    assert path.stat().st_mtime_ns == stamp
    seq = [[1, 2, 3, 4]]
    np.testing.assert_array_equal(first.add([0], seq), second.add([0], seq))
    # another format is another file
    q8 = model.decoder(tiny_q, quantize="q8")
    assert q8.quantized_now and q8.quantized_path != path


def test_corrupted_or_foreign_cache_is_rebuilt(tiny_copy, tiny_q, tmp_path):
    good = model.decoder(tiny_q, quantize="q8")
    path = good.quantized_path
    reference = good.add([0], [[5, 6, 7]])
    data = path.read_bytes()

    def reload():
        dec = model.decoder(tiny_q, quantize="q8")
        assert dec.quantized_path == path
        np.testing.assert_array_equal(dec.add([0], [[5, 6, 7]]), reference)
        return dec

    # a byte changed in the middle of the weights (the zip checksum catches it)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    assert reload().quantized_now
    # cut short
    path.write_bytes(data[: len(data) // 3])
    assert reload().quantized_now
    # not a zip file at all
    path.write_bytes(b"hello")
    assert reload().quantized_now
    # the q4 weights of the same checkpoint under the q8 name
    q4 = model.decoder(tiny_q, quantize="q4").quantized_path
    shutil.copyfile(q4, path)
    assert reload().quantized_now
    # the weights of another checkpoint (another key) under this name
    other = tmp_path / "other"
    shutil.copytree(TINY_DIR, other)
    with open(other / "model-1000.index", "ab") as f:
        f.write(b"\0")  # another index file: another key
    other_file = quantize.load_or_make(model.npdecode.cpu_weights(tiny_q), str(other / "model-1000"), "q8",
                                       tiny_q.hparams).path
    assert other_file.parent == other / "quantized" and other_file.name != path.name
    shutil.copyfile(other_file, path)
    assert reload().quantized_now
    assert not reload().quantized_now  # and the rebuilt file is used again


def test_a_changed_checkpoint_gets_new_weights_and_the_old_file_goes(tiny_q, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(TINY_DIR, d)
    w = model.npdecode.cpu_weights(tiny_q)
    first = quantize.load_or_make(w, str(d / "model-1000"), "q4", tiny_q.hparams)
    q8 = quantize.load_or_make(w, str(d / "model-1000"), "q8", tiny_q.hparams)
    os.utime(d / "model-1000.data-00000-of-00001", ns=(1, 1))  # the checkpoint was written again
    second = quantize.load_or_make(w, str(d / "model-1000"), "q4", tiny_q.hparams)
    assert second.made and second.path != first.path and second.path.is_file()
    assert not first.path.exists() and q8.path.exists()  # only the stale file of that format goes


def test_cache_goes_to_the_model_cache_when_the_checkpoint_directory_is_not_writable(tiny_q, tmp_path,
                                                                                       monkeypatch):
    d = tmp_path / "ro"
    shutil.copytree(TINY_DIR, d)
    (d / "quantized").write_text("not a directory")  # nothing can be written there
    home = tmp_path / "home"
    monkeypatch.setenv("GPT2JA_HOME", str(home))
    w = model.npdecode.cpu_weights(tiny_q)
    q = quantize.load_or_make(w, str(d / "model-1000"), "q4", tiny_q.hparams)
    assert q.made and q.path.parent == home / "quantized" and q.path.is_file()
    again = quantize.load_or_make(w, str(d / "model-1000"), "q4", tiny_q.hparams)
    assert not again.made and again.path == q.path


def test_load_quantized_decodes_as_the_full_model(tiny_copy, tiny_q):
    """model.load_quantized reads hparams and every array from the cache file: its decoder gives
    exactly the numbers of the decoder made from the loaded float32 model with the same format."""
    rng = np.random.default_rng(5)
    seqs = _contexts(3, rng)
    for fmt in ("q8", "q4"):
        full = model.decoder(tiny_q, quantize=fmt)  # makes or reads the cache file
        qm = model.load_quantized(tiny_copy, fmt)
        assert isinstance(qm, model.QuantizedModel)
        assert qm.hparams == tiny_q.hparams and qm.fmt == fmt and qm.path == tiny_q.path
        assert not qm.quantized.made and qm.quantized.path == full.quantized_path
        light = model.decoder(qm)
        assert light.quantize == fmt and model.choose_engine(qm) == "onnx"
        ids = list(range(len(seqs)))
        np.testing.assert_array_equal(light.add(ids, seqs), full.add(ids, seqs))
        for _ in range(3):
            tokens = rng.integers(0, 20573, len(seqs))
            np.testing.assert_array_equal(light.step(ids, tokens), full.step(ids, tokens))
    with pytest.raises(ValueError, match="holds q4 weights"):
        model.decoder(qm, quantize="q8")
    with pytest.raises(ValueError, match="holds q4 weights"):
        model.choose_engine(qm, "auto", "q8")


def test_load_quantized_without_a_cache_makes_it(tmp_path, tiny_q):
    d = tmp_path / "m"
    shutil.copytree(TINY_DIR, d)
    qm = model.load_quantized(d, "q4")
    assert qm.quantized.made and qm.quantized.path.parent == d / "quantized"
    assert not model.load_quantized(d, "q4").quantized.made
    with pytest.raises(model.ModelError, match="does not exist"):
        model.load_quantized(tmp_path / "missing", "q4")
    with pytest.raises(ValueError, match="unknown format"):
        model.load_quantized(d, "q2")


def test_the_cache_key_covers_hparams_json(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(TINY_DIR, d)
    prefix = model.find_checkpoint(d)
    before = quantize.checkpoint_key(prefix, "q8")
    (d / "hparams.json").write_text((d / "hparams.json").read_text() + "\n")
    assert quantize.checkpoint_key(prefix, "q8") != before


def test_quantized_decoding_needs_no_tensorflow(tiny_copy, env):
    """With the cache file there, neither model.load_quantized and its decoder nor
    gpt2-generate.py --quantize import TensorFlow."""
    model.load_quantized(tiny_copy, "q4")  # the cache file exists from here on
    code = ("import sys, model; qm = model.load_quantized(sys.argv[1], 'q4'); d = model.decoder(qm); "
            "d.add([0], [[1, 2, 3]]); d.step([0], [4]); print('tensorflow' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(tiny_copy)], capture_output=True, env=env, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().strip() == "False"
    code = ("import sys; from cli import generate; rc = generate.main(sys.argv[1:]); "
            "sys.stderr.write('TF=%s' % ('tensorflow' in sys.modules)); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "--model", str(tiny_copy), "--quantize", "q4", "--seed", "3",
                        "--num_generate", "2", "--max_length", "20", "--context", "今日は"],
                       capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.decode().endswith("TF=False") and p.stdout.decode().count("========\n") == 1


_WEIGHTS_IN_MEMORY = r"""
import json, mmap, os, sys
import model
from model import quantize
from model.ortdecode import OnnxDecoder

qm = model.load_quantized(sys.argv[1], sys.argv[2])
q = qm.quantized
dec = OnnxDecoder(qm.hparams, None, q, prepack=sys.argv[3] == "prepack")
dec.add([0], [[1, 2, 3]])
dec.step([0], [4])

def mapped(a):
    while a is not None and not isinstance(a, mmap.mmap):
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return a is not None

target = os.stat(q.path)
resident = 0
here = False
with open("/proc/self/smaps") as f:
    for line in f:
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's first line
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            here = int(fields[4]) == target.st_ino and os.makedev(major, minor) == target.st_dev
        elif here and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
print(json.dumps({"resident": resident, "matrices": sum(a.nbytes for k, a in q.arrays.items() if k.endswith("/q")),
                  "all_mapped": all(mapped(a) for a in q.arrays.values()), "external": len(dec._external),
                  "weights_file": str(dec.weights_file), "path": str(q.path)}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_quantized_weights_are_in_memory_once(tiny_copy, env, fmt):
    """The weights read from the cache file are in memory once, in ONNX Runtime's packed layout: the
    cache file is mapped (not read into memory), the session reads the weights from the file
    itself and lets each matrix go once packed, so that fewer bytes of the file are resident in the
    process after decoding than its 8-/4-bit matrices hold.  Before, the arrays were read into
    memory and handed to the session, which copied the ones not aligned to 64 bytes and packed
    them all: three copies at the peak (417-433 MB against 232 MB for q8, small shape).  The same
    measure with packing off (the session keeps the matrices it reads) sees them all."""
    model.load_quantized(tiny_copy, fmt)  # the cache file exists from here on
    runs = {}
    for prepack in ("prepack", "keep"):
        p = subprocess.run([sys.executable, "-c", _WEIGHTS_IN_MEMORY, str(tiny_copy), fmt, prepack],
                           capture_output=True, env=env, cwd=ROOT, timeout=120)
        assert p.returncode == 0, p.stderr
        runs[prepack] = json.loads(p.stdout)
    r = runs["prepack"]
    assert r["all_mapped"] and r["external"] == 0 and r["weights_file"] == r["path"]
    # resident: the scales (MatMulNBits keeps them), the biases and layer norms, a page or so of each
    # tensor the session maps, and the embedding rows looked up (with the kernel's fault-around)
    assert r["resident"] < r["matrices"], r
    assert runs["keep"]["resident"] >= r["matrices"], runs  # the measure sees matrices that are kept


# -- the tools ---------------------------------------------------------------------------------


def test_python_m_model_quantize(tiny_copy, env):
    shutil.rmtree(tiny_copy / "quantized", ignore_errors=True)
    command = [sys.executable, "-m", "model", "quantize", str(tiny_copy), "q8"]
    p = subprocess.run(command, capture_output=True, env=env, cwd=ROOT, timeout=180)
    assert p.returncode == 0, p.stderr
    path = p.stdout.decode().strip()
    assert os.path.isfile(path) and os.path.dirname(path) == str(tiny_copy / "quantized")
    stamp = os.stat(path).st_mtime_ns
    p = subprocess.run(command, capture_output=True, env=env, cwd=ROOT, timeout=180)
    assert p.returncode == 0 and p.stdout.decode().strip() == path and os.stat(path).st_mtime_ns == stamp
    p = subprocess.run(command[:-1] + ["q5"], capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and p.stdout == b""
    assert len(p.stderr.decode().strip().splitlines()) == 1 and "invalid choice" in p.stderr.decode()


def test_python_m_model_quantize_in_process(tiny_copy, capsys):
    assert model_main(["quantize", str(tiny_copy), "q4"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith(".npz") and os.path.isfile(out)


def test_generate_with_quantize_end_to_end(tiny_copy, env, capsys):
    args = ["--model", str(tiny_copy), "--gpu", "-1", "--quantize", "q8", "--seed", "1", "--num_generate", "3",
            "--max_length", "30", "--context", "今日は"]
    p = subprocess.run([sys.executable, str(ROOT / "gpt2-generate.py"), *args], capture_output=True, env=env,
                       cwd=ROOT, timeout=180)
    assert p.returncode == 0, p.stderr
    assert p.stderr == b""
    text = p.stdout.decode()
    assert text.count("========\n") == 2
    assert cli_generate.main(args) == 0
    assert capsys.readouterr().out == text  # deterministic with a seed
    # the tool reads the cache alone; a Generator over the loaded float32 model and q8 gives the same
    opts = GenerateOptions(top_k=40, max_length=30, seed=1)
    samples = Generator(model.load(tiny_copy), cli_generate.common.load_encoder(cli_generate.parser().parse_args([])),
                        quantize="q8").generate("今日は", 3, opts)
    assert "========\n".join(s + "\n" for s in samples) == text
    assert cli_generate.main(args[:5] + ["q4"] + args[6:]) == 0
    assert capsys.readouterr().out != text  # another format, other numbers (on this random model)


def test_bad_quantize_value_is_one_line(env):
    p = subprocess.run([sys.executable, str(ROOT / "gpt2-generate.py"), "--quantize", "q3"], capture_output=True,
                       env=env, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and p.stdout == b""
    err = p.stderr.decode()
    assert len(err.strip().splitlines()) == 1 and "--quantize" in err and "invalid choice" in err


def test_quantize_with_another_engine_is_a_usage_error(tiny_copy, env):
    from cli.errors import UsageError

    with pytest.raises(UsageError, match="onnx engine"):
        cli_generate.main(["--model", str(tiny_copy), "--quantize", "q4", "--engine", "numpy"])


# -- the benchmark's functions (so that they cannot rot) ---------------------------------------------


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quantize", ROOT / "bench" / "bench_quantize.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_functions_on_the_tiny_model(tiny_q, tiny_copy, enc, corpus_lines):
    bench = _bench()
    r = bench.rss(str(tiny_copy), formats=("q4",))
    assert set(r) == {"tensorflow itself", "numpy f32", "onnx q4"} and min(r.values()) > 0
    assert r["onnx q4"] < r["tensorflow itself"] < r["numpy f32"]  # quantized decoding loads no TensorFlow
    s = bench.speed(tiny_q, steps=2, batches=(1, 2))
    assert set(s["decode"]) == {f"{e} b{b}" for e in ("numpy f32", "onnx f32", "onnx q8", "onnx q4") for b in (1, 2)}
    assert all(r["tokens_per_s"] > 0 and r["x_bound"] > 0 for r in s["decode"].values())
    q = bench.quantize_times(tiny_q, formats=("q4",))
    assert q["q4"]["quantize_s"] > 0 and q["q4"]["cache_bytes"] > 0
    k = bench.kld(enc, corpus_lines[:300], train_steps=2, min_positions=60)
    assert k["training"]["steps"] == 2
    for fmt in ("q8", "q4"):
        assert k[fmt]["positions"] >= 60 and 0 <= k[fmt]["mean_kld"] < 1 and 0 <= k[fmt]["top1_agreement"] <= 1
    assert k["q8"]["mean_kld"] < k["q4"]["mean_kld"]


def test_teacher_forced_logits_are_the_decoders_logits(tiny_q):
    bench = _bench()
    seqs = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    got = bench.teacher_forced_logits(NumpyDecoder.from_model(tiny_q), seqs, rows=2)
    assert [g.shape[0] for g in got] == [3, 1, 2]
    for s, g in zip(seqs, got):
        np.testing.assert_allclose(g, tiny_q.logits([s])[0, :-1], atol=1e-4)


# -- the cache against hostile and unlucky file systems (issue 22, C11) ---------------------------


def _change_a_byte_in_place(path):
    """The middle byte of ``path`` changed in place, its size and modification time restored."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0x55]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _fresh(tmp_path, name="m"):
    d = tmp_path / name
    shutil.copytree(TINY_DIR, d)
    return d, str(d / "model-1000")


def test_a_symlink_at_the_cache_name_is_replaced_never_followed(tiny_q, tmp_path):
    """A link planted at the cache file's name (a shared $GPT2JA_HOME): its target is neither
    written nor read; the link itself is replaced by the cache file."""
    d, prefix = _fresh(tmp_path)
    w = model.npdecode.cpu_weights(tiny_q)
    key = quantize.checkpoint_key(prefix, "q8")
    path = quantize.cache_candidates(prefix, "q8", key)[0]
    path.parent.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path.symlink_to(victim)
    q = quantize.load_or_make(w, prefix, "q8", tiny_q.hparams)
    assert q.made and q.path == path
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and path.is_file()
    # a link to a perfectly valid cache file for this very key is not read either
    elsewhere = tmp_path / "elsewhere.npz"
    os.replace(path, elsewhere)
    path.symlink_to(elsewhere)
    again = quantize.load_or_make(w, prefix, "q8", tiny_q.hparams)
    assert again.made and not path.is_symlink()
    assert not quantize.load_or_make(w, prefix, "q8", tiny_q.hparams).made
    # a FIFO at the name is not opened (that would block) and is replaced
    path.unlink()
    os.mkfifo(path)
    assert quantize.load_or_make(w, prefix, "q8", tiny_q.hparams).made and path.is_file()


def _npy_header(shape, dtype="<f4") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_a_cache_file_declaring_huge_arrays_is_made_again(tiny_q, tmp_path):
    """Member headers are checked against the file's size and the expected shapes before anything is
    allocated: a crafted file declaring 10**13 elements is invalid, not a MemoryError."""
    import io
    import zipfile

    d, prefix = _fresh(tmp_path)
    w = model.npdecode.cpu_weights(tiny_q)
    good = quantize.load_or_make(w, prefix, "q4", tiny_q.hparams)
    data = good.path.read_bytes()
    wte_q = np.array(good.arrays["wte/q"])  # (good's arrays map the file, rewritten in place below)

    def craft(replace):
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
            for info in zin.infolist():
                body = zin.read(info)
                zout.writestr(info.filename, replace.get(info.filename, body))
        good.path.write_bytes(out.getvalue())

    huge = (10 ** 13,)
    for member, dtype in (("__meta__.npy", "|u1"), ("wte/s.npy", "<f4"), ("model/wpe.npy", "<f4")):
        craft({member: _npy_header(huge, dtype) + b"\0" * 64})
        q = quantize.load_or_make(w, prefix, "q4", tiny_q.hparams)
        assert q.made and q.path == good.path, member
        np.testing.assert_array_equal(q.arrays["wte/q"], wte_q)
    # a member that declares a compressed size beyond the file (a zip bomb) is refused the same way
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    good.path.write_bytes(out.getvalue())
    assert quantize.load_or_make(w, prefix, "q4", tiny_q.hparams).made
    assert model.load_quantized(d, "q4").quantized.made is False


def test_a_data_file_changed_in_place_with_size_and_mtime_restored_is_noticed(tiny_q, tmp_path):
    """The key sees sizes and modification times only; the change time and a content hash recorded
    in the cache file catch a rewrite that restores both (the float32 path then reports the
    corruption instead of decoding with stale weights)."""
    d, prefix = _fresh(tmp_path)
    made = model.load_quantized(d, "q8")
    assert made.quantized.made
    data = d / "model-1000.data-00000-of-00001"
    _change_a_byte_in_place(data)
    key = quantize.checkpoint_key(prefix, "q8")
    assert quantize.read_cache(made.quantized.path, None, "q8", key) is not None  # the key alone passes
    assert quantize.read_cache(made.quantized.path, None, "q8", key, prefix) is None
    with pytest.raises(model.ModelError):
        model.load_quantized(d, "q8")


def test_a_copied_checkpoint_reuses_its_cache_and_hashes_once(tmp_path, monkeypatch):
    """Other stamps with the same contents (cp -p, chmod, a restore): the data files are hashed once,
    the cache file is used and its stamps refreshed, so the next start reads nothing more."""
    d, _ = _fresh(tmp_path)
    assert model.load_quantized(d, "q4").quantized.made
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)  # copy2: mtimes kept, new inodes and change times
    calls = []
    digest = quantize.data_digest
    monkeypatch.setattr(quantize, "data_digest", lambda p: calls.append(p) or digest(p))
    first = model.load_quantized(copy, "q4")
    assert not first.quantized.made and first.quantized.path.parent == copy / "quantized"
    assert len(calls) == 1
    assert not model.load_quantized(copy, "q4").quantized.made
    assert len(calls) == 1


def test_checksums_are_read_through_once_per_unchanged_file(tmp_path, monkeypatch):
    """A cache file whose checksums passed is not read through again while its stamps (device, inode,
    size, modification and change time) are those recorded; any write to it -- even one restoring
    its size and modification time -- changes its change time: it is read through again and a
    corrupted member is caught.  A record for other stamps, or one planted as a link, is ignored."""
    d, _ = _fresh(tmp_path)
    reads = []
    check = quantize._check_member
    monkeypatch.setattr(quantize, "_check_member",
                        lambda *a, read_through=True: reads.append(read_through) or check(*a, read_through=read_through))
    made = model.load_quantized(d, "q8")
    assert made.quantized.made and reads and all(reads)  # written, then read through once
    path = made.quantized.path
    record = quantize._checked_path(path)
    assert record.is_file() and record.parent == quantize.default_cache_root() / "quantized" / "checked"
    reads.clear()
    again = model.load_quantized(d, "q8")
    assert not again.quantized.made and reads and not any(reads)  # headers checked, arrays not read through
    seq = [[5, 6, 7]]
    np.testing.assert_array_equal(model.decoder(again).add([0], seq), model.decoder(made).add([0], seq))

    # a byte of the weights changed in place, size and modification time restored
    _change_a_byte_in_place(path)
    reads.clear()
    assert model.load_quantized(d, "q8").quantized.made  # read through: the CRC caught it, made again
    assert reads[0] is True

    # a record for other stamps is not taken; nor is a valid record reached through a link
    reads.clear()
    assert not model.load_quantized(d, "q8").quantized.made and not any(reads)
    text = record.read_text()
    record.write_text(text.replace('"version"', '"other": 1, "version"'))
    reads.clear()
    assert not model.load_quantized(d, "q8").quantized.made and reads and all(reads)
    real = tmp_path / "record.json"
    reads.clear()
    assert not model.load_quantized(d, "q8").quantized.made and not any(reads)  # the record was renewed
    real.write_text(record.read_text() + " ")  # a valid record, were it followed
    record.unlink()
    record.symlink_to(real)
    reads.clear()
    assert not model.load_quantized(d, "q8").quantized.made and reads and all(reads)
    assert not record.is_symlink() and real.read_text().endswith(" ")  # replaced, never followed nor written
