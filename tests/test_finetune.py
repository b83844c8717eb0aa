"""Fine-tuning: dataset step, training, checkpoints, resume, Ctrl-C, errors (gpt2-encode.py, gpt2-finetune.py)."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import model
from tasks import dataset as D

from conftest import ROOT, spawn

ENCODE = str(ROOT / "gpt2-encode.py")
FINETUNE = str(ROOT / "gpt2-finetune.py")
CHUNK = 128  # the tiny fixture has n_ctx 1024; shorter chunks keep the tests fast


def _run(script, args, env, cwd, timeout=600):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


@pytest.fixture
def src_dir(tmp_path, corpus_lines):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("\n".join(corpus_lines[:150]), encoding="utf-8")
    (src / "sub" / "b.txt").write_text("\n".join(corpus_lines[150:300]), encoding="utf-8")
    (src / "skip.md").write_text("not a .txt file", encoding="utf-8")
    return src


@pytest.fixture
def dataset_npz(tmp_path, src_dir, enc):
    path = tmp_path / "data.npz"
    D.save_npz(path, D.encode_files(D.find_texts(src_dir), enc))
    return path


def _original_chunks(arrays, n_ctx, eos):
    """run_finetune.py's chunking, written out as its loop does it."""
    chunks = []
    for a in arrays:
        cur = []
        for t in a:
            cur.append(int(t))
            if len(cur) == n_ctx or cur[-1] == eos:
                chunks.append(cur)
                cur = []
        if len(cur) > 1:
            chunks.append(cur)
    return [c for c in chunks if len(c) > 1]


# ---------------------------------------------------------------------------- dataset

def test_npz_matches_the_encoder_in_parallel_and_through_the_script(src_dir, tmp_path, enc, env):
    files = D.find_texts(src_dir)
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    expected = []
    for f in files:
        expected += enc.encode(f.read_text(encoding="utf-8")) + [enc.eos_id]
    arrays = D.encode_files(files, enc, processes=2)
    assert np.concatenate(arrays).tolist() == expected
    out = tmp_path / "out"
    r = _run(ENCODE, ["--src_dir", str(src_dir), "--dst_file", str(out), "--num_process", "2"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    with np.load(str(out) + ".npz") as npz:
        assert npz.files == [f"arr_{i}" for i in range(len(npz.files))]
        assert np.concatenate([npz[n] for n in npz.files]).tolist() == expected
    assert np.concatenate(D.load_npz(str(out) + ".npz")).tolist() == expected


def test_clean_text_and_combine(src_dir, enc):
    files = D.find_texts(src_dir)
    arrays = D.encode_files(files, enc, clean=True, combine=1)
    assert len(arrays) == 2  # combine=1: one array per document
    assert arrays[0].tolist() == enc.encode(files[0].read_text(encoding="utf-8"), clean=True) + [enc.eos_id]


def test_chunks_are_cut_as_the_original_does():
    eos = 9
    rng = np.random.default_rng(0)
    arrays = [np.array([1, 2, 3, eos, 4, eos, eos, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, eos, 3], np.uint16),
              rng.integers(0, 9, 50).astype(np.uint16), np.array([5], np.uint16)]
    ch = D.Chunks.from_arrays(arrays, 4, eos)
    got = [ch.tokens[s:s + n].tolist() for s, n in zip(ch.starts, ch.lengths)]
    assert got == _original_chunks(arrays, 4, eos)
    ids, lens = ch.batch([0, 1])
    assert ids.shape == (2, 4) and lens.tolist() == [4, 2]
    assert ids[1].tolist() == [4, eos, eos, eos]  # short chunks are padded (and masked out of the loss)


def test_sampler_resumes_the_same_order():
    a = D.Sampler(7, seed=3)
    first = a.next(20)
    b = D.Sampler(7, seed=3, position=11)
    assert b.next(9).tolist() == first[11:].tolist()
    assert sorted(first[:7].tolist()) == list(range(7))


def test_dataset_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="no .txt files"):
        D.find_texts(tmp_path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(D.DatasetError, match="not a readable .npz"):
        D.load_npz(bad)
    with pytest.raises(D.DatasetError, match="no chunk"):
        D.Chunks.from_arrays([np.array([9, 9, 9])], 4, 9)


# ---------------------------------------------------------------------------- training

def test_loss_falls_and_save_load_gives_identical_logits(tiny_model_dir, dataset_npz, enc, tmp_path):
    from tasks import train as T

    m = model.load(tiny_model_dir)
    chunks = D.Chunks.from_arrays(D.load_npz(dataset_npz), CHUNK, enc.eos_id)
    probe = chunks.subset(np.arange(8))
    tr = T.Trainer(m, optim="adam", learning_rate=2e-3)
    before = tr.evaluate(probe, 4)
    sampler = D.Sampler(len(chunks), seed=0)
    for _ in range(30):
        loss = tr.train_step(*chunks.batch(sampler.next(4)))
        assert np.isfinite(loss)
    after = tr.evaluate(probe, 4)
    assert after <= 0.7 * before, (before, after)

    run = tmp_path / "run"
    T.save_run(tr, run, step=30)
    assert (run / "counter").read_text() == "30\n"
    assert 'model_checkpoint_path: "model-30"' in (run / "checkpoint").read_text()
    back = model.load(run)
    ids = chunks.batch([0, 1])[0]
    np.testing.assert_array_equal(back.logits(ids), m.logits(ids))
    # name-based restore, as the original's TF1 Saver reads it
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(run))
    shapes = reader.get_variable_to_shape_map()
    assert set(shapes) == set(model.variable_shapes(m.hparams))
    np.testing.assert_array_equal(reader.get_tensor("model/h1/mlp/c_fc/w")[0], m.variables["model/h1/mlp/c_fc/w"].numpy())

    # the optimizer state comes back too
    tr2 = T.Trainer(back, optim="adam", learning_rate=2e-3)
    assert T.restore_optimizer(tr2, run, 30)
    assert int(tr2.step.numpy()) == 30
    np.testing.assert_array_equal(tr2.slots["model/wte/Adam_1"].numpy(), tr.slots["model/wte/Adam_1"].numpy())


def test_accumulation_equals_the_big_batch(tiny_model_dir, dataset_npz, enc):
    from tasks import train as T

    chunks = D.Chunks.from_arrays(D.load_npz(dataset_npz), CHUNK, enc.eos_id)
    ids, lens = chunks.batch([0, 1, 2, 3])
    results = []
    for accumulate in (1, 2):
        m = model.load(tiny_model_dir)
        tr = T.Trainer(m, optim="sgd", learning_rate=0.1, accumulate=accumulate)
        loss = tr.train_step(ids, lens)
        results.append((loss, m.variables["model/h0/attn/c_attn/w"].numpy()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_save_keeps_the_newest_and_a_failed_save_keeps_the_previous(tiny_model_dir, tmp_path, monkeypatch):
    from model import checkpoint as C
    from tasks import train as T

    tr = T.Trainer(model.load(tiny_model_dir), optim="sgd")
    run = tmp_path / "run"
    for step in range(1, 8):
        T.save_run(tr, run, step)
    assert T.checkpoint_steps(run) == [3, 4, 5, 6, 7]
    # only the newest checkpoint keeps its optimizer state (resuming needs no other)
    assert sorted(p.name for p in run.glob("optimizer-*.npz")) == ["optimizer-7.npz"]
    T.save_run(tr, run, 8, keep=2)
    assert T.checkpoint_steps(run) == [7, 8]

    def crash(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(C, "write_state_file", crash)
    with pytest.raises(model.ModelError, match="cannot save checkpoint .*model-9: No space left on device; "
                                               "the previous checkpoint is kept"):
        T.save_run(tr, run, 9)
    assert T.latest_step(run) == 8
    assert model.load(run).path.endswith("model-8")
    assert T.checkpoint_steps(run) == [7, 8] and not (run / "optimizer-9.npz").exists()
    assert (run / "optimizer-8.npz").is_file()


# ---------------------------------------------------------------------------- the CLI

def _finetune(dataset, tmp_path, env, *extra, base=None):
    args = ["--model", str(base), "--dataset", str(dataset), "--run_name", "r", "--chunk", str(CHUNK),
            "--learning_rate", "1e-3", "--seed", "1", *extra]
    return _run(FINETUNE, args, env, tmp_path)


def test_cli_trains_resumes_and_the_result_loads(tiny_model_dir, dataset_npz, tmp_path, env):
    r = _finetune(dataset_npz, tmp_path, env, "--max_steps", "2", "--save_every", "1", "--batch_size", "2",
                  "--accumulate", "2", "--val_fraction", "0.1", "--eval_every", "1", base=tiny_model_dir)
    assert r.returncode == 0, r.stderr
    assert "step 1: val_loss" in r.stdout and "step 2: val_loss" in r.stdout
    run = tmp_path / "checkpoint" / "r"
    assert (run / "counter").read_text() == "2\n"
    assert (run / "hparams.json").is_file()
    r = _finetune(dataset_npz, tmp_path, env, "--max_steps", "4", "--save_every", "10", "--batch_size", "2",
                  "--accumulate", "2", base=tiny_model_dir)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "at step 2" in r.stderr
    assert "optimizer starts afresh" not in r.stderr
    assert (run / "counter").read_text() == "4\n"
    assert T_latest(run) == 4
    m = model.load(run)
    assert m.path.endswith("model-4")
    # every tool loads it with --model checkpoint/RUN
    g = subprocess.run([sys.executable, str(ROOT / "gpt2-generate.py"), "--model", "checkpoint/r",
                        "--num_generate", "1", "--max_length", "10", "--seed", "1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert g.returncode == 0, g.stderr
    assert g.stdout.strip()


def T_latest(run):
    from tasks import train as T
    return T.latest_step(run)


def test_cli_ctrl_c_saves_and_exits_quietly(tiny_model_dir, dataset_npz, tmp_path, env):
    args = [sys.executable, FINETUNE, "--model", str(tiny_model_dir), "--dataset", str(dataset_npz),
            "--run_name", "r", "--chunk", "64", "--save_every", "1"]
    p = spawn(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    counter = tmp_path / "checkpoint" / "r" / "counter"
    try:
        deadline = time.monotonic() + 120
        while not counter.is_file() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # wait until training is under way (a first step saved)
        assert p.poll() is None, p.communicate()[1]
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert "interrupted" in err and "saved" in err
    step = T_latest(tmp_path / "checkpoint" / "r")
    assert step is not None and step >= 1
    assert (tmp_path / "checkpoint" / "r" / "counter").read_text() == f"{step}\n"


def test_cli_refuses_a_run_directory_of_another_shape(tiny_model_dir, dataset_npz, tmp_path, env):
    other = tmp_path / "other"
    weights = model.random_weights(model.HParams(n_vocab=20573, n_ctx=1024, n_embd=64, n_head=4, n_layer=1))
    model.save(weights, other, step=0)
    # a run directory of another shape
    # (a directory of .txt files as the dataset, and --epochs: 60 chunks x 0.02 -> 2 steps)
    r = _finetune(tmp_path / "src", tmp_path, env, "--epochs", "0.02", "--num_process", "2", base=other)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "checkpoint" / "r" / "counter").read_text() == "2\n"
    r = _finetune(dataset_npz, tmp_path, env, "--max_steps", "2", base=tiny_model_dir)
    assert r.returncode == 2
    assert "another shape" in r.stderr and r.stderr.count("\n") == 1, r.stderr
