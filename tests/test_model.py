"""The GPT-2 model package: goldens, KV cache, batching, checkpoints, errors."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT

import model
from model import HParams, ModelError

TOL = 1e-4


# --------------------------------------------------------------------------- helpers and fixtures

@pytest.fixture(scope="module")
def gold(golden):
    with np.load(golden / "tiny" / "logits.npz") as data:
        return {k: data[k] for k in data.files}


def _contexts(gold):
    return [gold[f"ids_{i}"].tolist() for i in range(14)]


def copy_model(src, dst, skip=()):
    """Copy a model directory file by file (plain, writable copies of read-only files)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copyfile(f, dst / f.name)
    return dst


SMALL_HP = HParams(n_vocab=50, n_ctx=32, n_embd=128, n_head=2, n_layer=3)


def write_random(path, hp=SMALL_HP, seed=0, step=7, **save_kw):
    weights = model.random_weights(hp, seed=seed, numpy=True)
    model.save(weights, path, step=step, hparams=hp, **save_kw)
    return weights


# --------------------------------------------------------------------------- import, stdout

def test_light_import_and_clean_stdout(tiny_model_dir):
    code = textwrap.dedent(f"""
        import sys
        import model
        from model import ModelError, HParams, check_vocab, RELEASED
        import model.hparams, model.errors
        from model import find_checkpoint
        find_checkpoint({str(tiny_model_dir)!r})
        assert "tensorflow" not in sys.modules, "light import pulled in TensorFlow"
        m = model.load({str(tiny_model_dir)!r})
        m.logits([[1, 2, 3]])
        assert "tensorflow" in sys.modules
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "oneDNN" not in proc.stderr and "absl::InitializeLog" not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- golden numbers

def test_hparams_from_json(tiny):
    assert tiny.hparams == HParams(n_vocab=20573, n_ctx=1024, n_embd=64, n_head=4, n_layer=2)
    assert tiny.path.endswith("model-1000")


def test_golden_last_position(tiny, gold):
    for i, ids in enumerate(_contexts(gold)):
        logits = tiny.logits([ids])
        hidden = tiny.hidden([ids])
        assert logits.shape == (1, len(ids), 20573) and logits.dtype == np.float32
        assert hidden.shape == (1, len(ids), 64) and hidden.dtype == np.float32
        np.testing.assert_allclose(logits[0, -1], gold[f"logits_last_{i}"], rtol=0, atol=TOL)
        np.testing.assert_allclose(hidden[0, -1], gold[f"h_last_{i}"], rtol=0, atol=TOL)


def test_golden_every_position(tiny, gold):
    ids = gold["ids_0"][None, :]  # 2-D int array input
    np.testing.assert_allclose(tiny.logits(ids)[0], gold["logits_0"], rtol=0, atol=TOL)


# --------------------------------------------------------------------------- batching

def test_batch_equals_rows(tiny, gold):
    rows = [ids[:8] for ids in _contexts(gold)]  # every context has >= 5 tokens; cut to 8 or fewer
    rows = [r for r in rows if len(r) == 8]
    assert len(rows) >= 5
    batch = tiny.logits(rows)
    for b, r in enumerate(rows):
        np.testing.assert_allclose(batch[b], tiny.logits([r])[0], rtol=0, atol=TOL)


def test_right_padded_ragged_batch(tiny, gold):
    rows = _contexts(gold)[:6]
    logits, hidden = tiny.logits(rows), tiny.hidden(rows)
    width = max(map(len, rows))
    assert logits.shape == (6, width, 20573)
    for b, r in enumerate(rows):
        np.testing.assert_allclose(logits[b, :len(r)], tiny.logits([r])[0], rtol=0, atol=TOL)
        np.testing.assert_allclose(hidden[b, -1 if len(r) == width else len(r) - 1], gold[f"h_last_{b}"],
                                   rtol=0, atol=TOL)
        assert not logits[b, len(r):].any()  # padding positions are zeroed
    # the same with an explicitly padded array and lengths
    arr = np.full((6, width), 7, dtype=np.int64)
    for b, r in enumerate(rows):
        arr[b, :len(r)] = r
    np.testing.assert_array_equal(tiny.logits(arr, lengths=[len(r) for r in rows]), logits)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.lists(st.integers(0, 20572), min_size=1, max_size=12), min_size=1, max_size=4))
def test_padding_never_changes_real_positions(tiny, rows):
    batch = tiny.logits(rows)
    for b, r in enumerate(rows):
        np.testing.assert_allclose(batch[b, :len(r)], tiny.logits([r])[0], rtol=0, atol=TOL)


def test_hidden_layers(tiny, gold):
    ids = [_contexts(gold)[2]]
    final = tiny.hidden(ids)
    last_block = tiny.hidden(ids, layer=tiny.hparams.n_layer - 1)
    g, b = (tiny.variables[f"model/ln_f/{n}"].numpy() for n in "gb")
    u = last_block.mean(-1, keepdims=True)
    var = ((last_block - u) ** 2).mean(-1, keepdims=True)
    np.testing.assert_allclose((last_block - u) / np.sqrt(var + 1e-5) * g + b, final, rtol=0, atol=TOL)
    first = tiny.hidden(ids, layer=0)
    assert first.shape == final.shape and not np.allclose(first, last_block)
    for bad in (-2, 2, 1.0, True):
        with pytest.raises(ModelError, match="layer"):
            tiny.hidden(ids, layer=bad)



def test_attention_in_parts_gives_the_same_numbers(tiny_model_dir, monkeypatch):
    """A batch longer than 2 x QUERIES positions has forward passes of its own that compute the
    attention scores of QUERIES query positions at a time: the same numbers, bit for bit, as all at
    once -- a ragged batch whose lengths are not multiples of QUERIES, final states, a block's
    residual, logits -- each built once; shorter batches keep the one product."""
    from model import gpt2

    assert 2 * gpt2.QUERIES < 700
    rng = np.random.default_rng(5)
    rows = [rng.integers(0, 20572, n).tolist() for n in (1000, 700, 257, 40)]
    monkeypatch.setattr(gpt2, "QUERIES", None)  # never in parts
    whole = model.load(tiny_model_dir)
    expected = (whole.hidden(rows), whole.hidden(rows, layer=0), whole.logits(rows[1:3]))
    assert all(key[-1] is None for key in whole._forward_fns)
    monkeypatch.undo()
    parts = model.load(tiny_model_dir)
    got = (parts.hidden(rows), parts.hidden(rows, layer=0), parts.logits(rows[1:3]))
    for e, g in zip(expected, got):
        assert e.shape == g.shape and np.array_equal(e, g)
    assert all(key[-1] == gpt2.QUERIES for key in parts._forward_fns)
    count = parts.tracing_count()
    parts.hidden(rows[1:])  # another long shape: the same function
    assert parts.tracing_count() == count
    short = [r[:2 * gpt2.QUERIES] for r in rows]
    np.testing.assert_array_equal(parts.hidden(short), whole.hidden(short))
    assert (("hidden", 2, None) in parts._forward_fns) and parts.tracing_count() == count + 1


def test_bad_inputs(tiny):
    with pytest.raises(ModelError, match="outside the vocabulary"):
        tiny.logits([[1, 20573]])
    with pytest.raises(ModelError, match="longer than the model's context"):
        tiny.logits([[1] * 1025])
    with pytest.raises(ModelError, match="2-D"):
        tiny.logits(np.array([1, 2, 3]))
    with pytest.raises(ModelError):
        tiny.logits([])
    with pytest.raises(ModelError):
        tiny.logits([[1, 2], []])


def test_a_batch_of_lists_tuples_arrays_or_iterables_is_the_same_batch():
    from model.batch import as_batch

    hp = HParams(n_vocab=20573, n_ctx=16, n_embd=8, n_head=2, n_layer=1)
    want = (np.array([[1, 2, 3], [4, 0, 0], [5, 6, 0], [1, 0, 0]], np.int32), np.array([3, 1, 2, 2], np.int32))
    got = as_batch([[1, 2, 3], (4,), np.array([5, 6], np.int16), iter([True, False])], hp)
    assert all((g == w).all() and g.dtype == w.dtype for g, w in zip(got, want))
    for bad in ([[1, 2.0]], [[1, "2"]], [[1, None]], [[1, [2]]], [5, 6], [[10 ** 30]], [np.zeros((2, 2), int)]):
        with pytest.raises(ModelError, match="integers"):
            as_batch(bad, hp)


def test_forward_is_not_retraced(tiny):
    tiny.hidden([[1, 2, 3]])
    count = tiny.tracing_count()
    assert count >= 1
    for shape in ((1, 5), (3, 9), (2, 17)):
        tiny.hidden(np.ones(shape, dtype=np.int32))
    assert tiny.tracing_count() == count


# --------------------------------------------------------------------------- KV cache

def test_cache_token_by_token_equals_full(tiny, gold):
    ids = gold["ids_0"].tolist()
    full = gold["logits_0"]
    cache, last = tiny.start([ids[:3]], max_len=len(ids))
    assert last.shape == (1, 20573)
    np.testing.assert_allclose(last[0], full[2], rtol=0, atol=TOL)
    for t in range(3, len(ids)):
        out = tiny.step(cache, [ids[t]])
        np.testing.assert_allclose(out[0], full[t], rtol=0, atol=TOL)
    assert cache.room == 0 and cache.lengths.tolist() == [len(ids)]
    with pytest.raises(ModelError, match="cache is full"):
        tiny.step(cache, [1])


def test_cache_ragged_batch_equals_rows(tiny, gold):
    ctx = _contexts(gold)
    prompts = [ctx[0][:9], ctx[1][:3], ctx[3][:6]]
    cache, last = tiny.start(prompts, max_len=20)
    seqs = [list(p) for p in prompts]
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(last[b], tiny.logits([p])[0, -1], rtol=0, atol=TOL)
    for t in range(6):
        nxt = [ctx[i][len(p) + t] for i, p in zip((0, 1, 3), prompts)]
        out = tiny.step(cache, np.array(nxt))
        for b, tok in enumerate(nxt):
            seqs[b].append(tok)
            np.testing.assert_allclose(out[b], tiny.logits([seqs[b]])[0, -1], rtol=0, atol=TOL)
    assert cache.lengths.tolist() == [len(s) for s in seqs]


def test_cache_long_span_and_no_retracing(tiny):
    rng = np.random.default_rng(1)
    seq = rng.integers(0, 20573, 262).tolist()
    cache, last = tiny.start([seq[:250]])  # max_len defaults to n_ctx
    full = tiny.logits([seq])[0]
    np.testing.assert_allclose(last[0], full[249], rtol=0, atol=TOL)
    for t in range(250, 262):  # crosses from the short-span to the long-span attention
        np.testing.assert_allclose(tiny.step(cache, [seq[t]])[0], full[t], rtol=0, atol=TOL)
    count = tiny.tracing_count()
    for b, n in ((2, 5), (1, 11), (3, 2)):
        c, _ = tiny.start(rng.integers(0, 20573, (b, n)), max_len=n + 3)
        tiny.step(c, [1] * b)
    assert tiny.tracing_count() == count


def test_cache_argument_errors(tiny):
    with pytest.raises(ModelError, match="max_len"):
        tiny.start([[1, 2, 3]], max_len=2)
    with pytest.raises(ModelError, match="max_len"):
        tiny.start([[1, 2, 3]], max_len=2000)
    cache, _ = tiny.start([[1, 2, 3], [4, 5]], max_len=8)
    with pytest.raises(ModelError, match="next ids"):
        tiny.step(cache, [1])
    with pytest.raises(ModelError, match="vocabulary"):
        tiny.step(cache, [1, -1])


# --------------------------------------------------------------------------- writing checkpoints

def test_save_load_round_trip(tiny, tmp_path):
    prefix = model.save(tiny, tmp_path / "out", step=1234)
    assert prefix == str(tmp_path / "out" / "model-1234")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["checkpoint", "hparams.json", "model-1234.data-00000-of-00001", "model-1234.index"]
    state = (tmp_path / "out" / "checkpoint").read_text()
    assert 'model_checkpoint_path: "model-1234"' in state and str(tmp_path) not in state
    assert json.loads((tmp_path / "out" / "hparams.json").read_text()) == tiny.hparams.to_dict()
    back = model.load(tmp_path / "out")
    assert back.hparams == tiny.hparams
    for name, var in tiny.variables.items():
        np.testing.assert_array_equal(back.variables[name].numpy(), var.numpy())
    # a second save keeps the first one listed and points at the new one
    model.save(back, tmp_path / "out", step=1300)
    state = (tmp_path / "out" / "checkpoint").read_text()
    assert 'model_checkpoint_path: "model-1300"' in state
    assert 'all_model_checkpoint_paths: "model-1234"' in state
    assert model.load(tmp_path / "out").path.endswith("model-1300")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_random_checkpoint_round_trip(tmp_path):
    weights = write_random(tmp_path / "r", seed=3)
    m = model.load(tmp_path / "r")
    assert m.hparams == SMALL_HP
    for name, value in weights.items():
        got = m.checkpoint_tensors()[name].numpy()
        np.testing.assert_array_equal(got, value)
    again = model.random_weights(SMALL_HP, seed=3, numpy=True)
    assert all(np.array_equal(again[k], weights[k]) for k in weights)
    other = model.random_weights(SMALL_HP, seed=4, numpy=True)
    assert not np.array_equal(other["model/wte"], weights["model/wte"])
    assert np.isfinite(m.logits([[1, 2, 3, 4]])).all()


def test_name_based_restore_with_tf1_saver(tiny, tmp_path):
    """What the original tools do: tf.compat.v1 variables named model/..., Saver.restore."""
    import tensorflow as tf
    prefix = model.save(tiny, tmp_path / "tf1", step=5)
    expected = model.hparams.variable_shapes(tiny.hparams)
    with tf.Graph().as_default():
        with tf.compat.v1.variable_scope("model"):
            graph_vars = {f"model/{n[len('model/'):]}": tf.compat.v1.get_variable(n[len("model/"):], shape)
                          for n, shape in expected.items()}
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            saver.restore(sess, tf.train.latest_checkpoint(str(tmp_path / "tf1")))
            values = sess.run(graph_vars)
    assert tf.train.latest_checkpoint(str(tmp_path / "tf1")) == prefix
    ours = tiny.checkpoint_tensors()
    for name, value in values.items():
        np.testing.assert_array_equal(value, ours[name].numpy())


def test_tf1_saver_checkpoint_loads(tmp_path):
    """A checkpoint written by a TF1 Saver (like the released ones) loads, hparams inferred."""
    import tensorflow as tf
    hp = HParams(n_vocab=40, n_ctx=16, n_embd=64, n_head=1, n_layer=2)
    out = tmp_path / "saver"
    with tf.Graph().as_default():
        with tf.compat.v1.variable_scope("model"):
            for n, shape in model.hparams.variable_shapes(hp).items():
                tf.compat.v1.get_variable(n[len("model/"):], shape,
                                          initializer=tf.compat.v1.random_normal_initializer(stddev=0.02))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(out / "model"), global_step=42)
            values = {v.op.name: sess.run(v) for v in tf.compat.v1.global_variables()}
    m = model.load(out)  # no hparams.json: inferred from shapes
    assert m.hparams == hp and m.path.endswith("model-42")
    for name, value in values.items():
        np.testing.assert_array_equal(m.checkpoint_tensors()[name].numpy(), value)


def test_save_rejects_bad_weights(tmp_path):
    weights = model.random_weights(SMALL_HP, numpy=True)
    del weights["model/h1/mlp/c_fc/b"]
    with pytest.raises(ModelError, match="model/h1/mlp/c_fc/b"):
        model.save(weights, tmp_path / "bad", hparams=SMALL_HP)
    assert not (tmp_path / "bad" / "checkpoint").exists()
    with pytest.raises(ModelError, match="step"):
        model.save(model.random_weights(SMALL_HP), tmp_path / "bad", step=-1)


def test_make_checkpoint_script(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_checkpoint", ROOT / "bench" / "make_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["tiny", str(tmp_path / "t"), "--seed", "5"]) == 0
    m = model.load(tmp_path / "t")
    assert m.hparams == script.SHAPES["tiny"] == model.HParams.from_json_file(ROOT / "tests" / "data" / "gpt2ja-tiny" / "hparams.json")
    assert np.isfinite(m.logits([[1, 2, 3]])).all()
    assert model.RELEASED["small"].n_params == 101_642_496


# --------------------------------------------------------------------------- finding checkpoints

def test_stale_absolute_state_path(tiny_model_dir, tmp_path, gold):
    d = copy_model(tiny_model_dir, tmp_path / "moved")
    (d / "checkpoint").write_text('model_checkpoint_path: "/old/place/gpt2ja-tiny/model-1000"\n'
                                  'all_model_checkpoint_paths: "/old/place/gpt2ja-tiny/model-1000"\n')
    m = model.load(d)
    assert m.path == str(d / "model-1000")
    np.testing.assert_allclose(m.logits([gold["ids_12"].tolist()])[0, -1], gold["logits_last_12"], atol=TOL)


def test_absolute_and_relative_state_paths(tmp_path):
    write_random(tmp_path / "a", step=1)
    write_random(tmp_path / "a", step=2, seed=1)
    (tmp_path / "a" / "checkpoint").write_text(f'model_checkpoint_path: "{tmp_path / "a" / "model-1"}"\n')
    assert model.find_checkpoint(tmp_path / "a") == str(tmp_path / "a" / "model-1")
    (tmp_path / "a" / "checkpoint").write_text('model_checkpoint_path: "model-2"\n')
    assert model.find_checkpoint(tmp_path / "a") == str(tmp_path / "a" / "model-2")


def test_without_state_file_newest_index(tmp_path):
    d = tmp_path / "n"
    for step in (5, 12, 9):
        write_random(d, step=step, seed=step)
    (d / "checkpoint").unlink()
    assert model.find_checkpoint(d) == str(d / "model-12")  # by N, not by name
    m = model.load(d)
    expect = model.random_weights(SMALL_HP, seed=12, numpy=True)["model/wte"]
    np.testing.assert_array_equal(m.variables["model/wte"].numpy(), expect)


def test_hparams_inferred_from_shapes(tmp_path):
    d = tmp_path / "inf"
    write_random(d)
    (d / "hparams.json").unlink()
    m = model.load(d)
    assert m.hparams == SMALL_HP  # n_head = 128 // 64


# --------------------------------------------------------------------------- errors

def _load_error(path):
    with pytest.raises(ModelError) as info:
        model.load(path)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_error_missing_dir(tmp_path):
    assert "does not exist" in _load_error(tmp_path / "nope")


def test_error_file_not_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a directory" in _load_error(f)


def test_error_empty_dir(tmp_path):
    assert "no checkpoint" in _load_error(tmp_path)


def test_error_state_names_missing_checkpoint(tmp_path):
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model-77"\n')
    msg = _load_error(tmp_path)
    assert "model-77" in msg


def test_error_truncated_data(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "t")
    data = d / "model-1000.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    msg = _load_error(d)
    assert "model-1000" in msg


def test_error_corrupted_data(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "c")
    data = d / "model-1000.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100:200] = bytes(100)  # inside model/h0/... : the checksum no longer matches
    raw[-300:] = bytes(300)
    data.write_bytes(bytes(raw))
    assert "model-1000" in _load_error(d)


def test_error_missing_data_file(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "m", skip={"model-1000.data-00000-of-00001"})
    assert "data" in _load_error(d)


def test_error_garbage_index(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "g")
    (d / "model-1000.index").write_bytes(b"this is not a checkpoint index" * 10)
    assert "model-1000.index" in _load_error(d)


def test_error_missing_variable(tmp_path):
    weights = model.random_weights(SMALL_HP, numpy=True)
    weights["model/h2/attn/c_proj/b"] = np.zeros(3, np.float32)  # pass save's check, then drop
    weights.pop("model/h2/attn/c_proj/b")
    import tensorflow as tf
    (tmp_path / "mv").mkdir()
    names = list(weights)
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "mv" / "model-1"), tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=[weights[n] for n in names])
    (tmp_path / "mv" / "hparams.json").write_text(SMALL_HP.to_json())
    msg = _load_error(tmp_path / "mv")
    assert "missing variable model/h2/attn/c_proj/b" in msg


def test_error_misshaped_variable(tmp_path):
    import tensorflow as tf
    weights = model.random_weights(SMALL_HP, numpy=True)
    weights["model/h1/mlp/c_fc/w"] = np.zeros((1, 128, 500), np.float32)
    names = list(weights)
    (tmp_path / "ms").mkdir()
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "ms" / "model-1"), tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=[weights[n] for n in names])
    msg = _load_error(tmp_path / "ms")
    assert "model/h1/mlp/c_fc/w" in msg and "[1, 128, 500]" in msg and "[1, 128, 512]" in msg


def test_error_hparams_inconsistent(tmp_path):
    d = tmp_path / "h"
    write_random(d)
    (d / "hparams.json").write_text(json.dumps({**SMALL_HP.to_dict(), "n_embd": 256}))
    msg = _load_error(d)
    assert "model/wte" in msg and "[50, 128]" in msg and "[50, 256]" in msg and "hparams.json" in msg
    (d / "hparams.json").write_text(json.dumps({**SMALL_HP.to_dict(), "n_layer": 2}))
    assert "model/h2" in _load_error(d)
    (d / "hparams.json").write_text(json.dumps({**SMALL_HP.to_dict(), "n_head": 3}))
    assert "n_head" in _load_error(d)
    (d / "hparams.json").write_text("{not json")
    assert "hparams.json" in _load_error(d)
    (d / "hparams.json").write_text(json.dumps({"n_vocab": 50}))
    assert "missing" in _load_error(d)


def test_error_vocab_mismatch(tiny):
    tiny.check_vocab_size(20573)
    model.check_vocab(tiny.hparams, 20573)
    with pytest.raises(ModelError, match="20573"):
        tiny.check_vocab_size(20000)
    with pytest.raises(ModelError, match="n_vocab=20573"):
        model.check_vocab(tiny.hparams, 50257)


def test_model_error_is_one_line():
    assert str(ModelError("a\nb   c")) == "a b c"


def test_hparams_validation():
    with pytest.raises(ModelError):
        HParams(n_vocab=0, n_ctx=1, n_embd=64, n_head=1, n_layer=1)
    with pytest.raises(ModelError):
        HParams.from_dict({"n_vocab": 1, "n_ctx": 1, "n_embd": "64", "n_head": 1, "n_layer": 1})
    hp = HParams.from_dict({"n_vocab": 10, "n_ctx": 8, "n_embd": 64.0, "n_head": 2, "n_layer": 1, "extra": 1})
    assert hp.head_dim == 32


# --------------------------------------------------------------------------- devices

def test_select_device_cpu(capsys):
    assert model.select_device("-1") == "/CPU:0"
    import tensorflow as tf
    if not tf.config.list_physical_devices("GPU"):
        assert model.select_device("0") == "/CPU:0"
        assert capsys.readouterr().err == ""
        assert model.select_device("3", verbose=True) == "/CPU:0"
        captured = capsys.readouterr()
        assert "GPU 3" in captured.err and captured.out == ""
    with pytest.raises(ModelError):
        model.select_device("gpu0")


def test_load_on_device(tiny_model_dir, gold):
    m = model.load(tiny_model_dir, device=model.select_device("-1"))
    assert m.device == "/CPU:0"
    assert "CPU:0" in m.variables["model/wte"].device
    np.testing.assert_allclose(m.logits([gold["ids_5"].tolist()])[0, -1], gold["logits_last_5"], atol=TOL)
