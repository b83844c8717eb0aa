"""LoRA adapters (model.lora, gpt2-finetune.py --lora, --lora DIR, python -m model merge) and bf16 training."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import model
from model import lora
from tasks import dataset as D

from conftest import ROOT

FINETUNE = str(ROOT / "gpt2-finetune.py")
GENERATE = str(ROOT / "gpt2-generate.py")
CHUNK = 64


@pytest.fixture(scope="module")
def chunks(corpus_lines, enc):
    arrays = [np.array(enc.encode("\n".join(corpus_lines[:300])) + [enc.eos_id], np.int32)]
    return D.Chunks.from_arrays(arrays, CHUNK, enc.eos_id)


@pytest.fixture
def text_file(tmp_path, corpus_lines):
    path = tmp_path / "a.txt"
    path.write_text("\n".join(corpus_lines[:300]), encoding="utf-8")
    return path


def _run(args, env, cwd, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def _train(m, chunks, steps, adapter=None, precision="fp32", lr=1e-2, optim="adam", batch=4):
    from tasks import train as T
    tr = T.Trainer(m, optim=optim, learning_rate=lr, adapter=adapter, precision=precision)
    sampler = D.Sampler(len(chunks), seed=0)
    losses = [tr.train_step(*chunks.batch(sampler.next(batch))) for _ in range(steps)]
    return tr, losses


def test_a_new_adapter_is_the_base_model_and_only_it_trains(tiny_model_dir, chunks):
    m = model.load(tiny_model_dir)
    ids = chunks.batch([0, 1])[0]
    base = m.logits(ids)
    frozen = {n: v.numpy().copy() for n, v in m.variables.items()}
    probe = chunks.subset(np.arange(8))
    from tasks import train as T
    base_loss = T.Trainer(m).evaluate(probe, 4)
    ad = lora.attach(m, rank=4, alpha=8)
    np.testing.assert_array_equal(m.logits(ids), base)  # B starts at zero: exactly the base model
    hp = m.hparams
    e = hp.n_embd
    assert ad.n_params == hp.n_layer * 4 * ((e + 3 * e) + (e + e) + (e + 4 * e) + (4 * e + e))
    before = T.Trainer(m, adapter=ad).evaluate(probe, 4)
    assert before == base_loss
    tr, losses = _train(m, chunks, 25, adapter=ad)
    assert sorted(tr.names) == sorted(ad.variables) and len(tr.names) == 2 * 4 * hp.n_layer
    after = tr.evaluate(probe, 4)
    assert all(np.isfinite(losses))
    assert after <= 0.9 * before, (before, after)
    for n, v in m.variables.items():  # the base weights never move
        np.testing.assert_array_equal(v.numpy(), frozen[n])
    assert not np.array_equal(m.logits(ids), base)


def test_adapter_file_merge_and_another_base(tiny_model_dir, chunks, tmp_path, env):
    from tasks import train as T
    m = model.load(tiny_model_dir)
    ad = lora.attach(m, rank=2, targets="attn")
    tr, _ = _train(m, chunks, 5, adapter=ad)
    run = tmp_path / "run"
    T.save_run(tr, run, step=5)
    path = run / "adapter-5.npz"
    assert lora.find_adapter(run) == path and T.latest_step(run) == 5
    with np.load(path) as npz:  # the adapters and their settings, nothing else
        assert set(npz.files) == set(ad.variables) | {lora.META}
    assert path.stat().st_size <= 4 * ad.n_params + 16384
    assert path.stat().st_size < (tiny_model_dir / "model-1000.data-00000-of-00001").stat().st_size / 50
    saved = lora.read_adapter(run)
    assert (saved.rank, saved.alpha, saved.targets, saved.step) == (2, 2.0, ("attn/c_attn", "attn/c_proj"), 5)

    ids = chunks.batch([0, 1, 2])[0]
    want = m.logits(ids)
    np.testing.assert_allclose(model.load(tiny_model_dir, lora=run).logits(ids), want, atol=1e-5, rtol=0)
    out = tmp_path / "merged"
    r = _run(["-m", "model", "merge", str(tiny_model_dir), str(run), str(out)], env, ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "model-5")
    assert {p.name for p in out.iterdir()} == {"checkpoint", "hparams.json", "model-5.index",
                                               "model-5.data-00000-of-00001"}
    np.testing.assert_allclose(model.load(out).logits(ids), want, atol=1e-5, rtol=0)

    # the tools: --model BASE --lora RUN gives what --model MERGED gives
    texts = []
    for extra in (["--model", str(tiny_model_dir), "--lora", str(run)], ["--model", str(out)]):
        g = _run([GENERATE, *extra, "--num_generate", "1", "--max_length", "12", "--seed", "3"], env, tmp_path)
        assert g.returncode == 0, g.stderr
        texts.append(g.stdout)
    assert texts[0] == texts[1] and texts[0].strip()

    # an adapter is refused by another base (same shape, other weights): one line
    with pytest.raises(model.ModelError, match="made for another base model"):
        model.load(out, lora=run)
    g = _run([GENERATE, "--model", str(out), "--lora", str(run), "--num_generate", "1"], env, tmp_path)
    assert g.returncode == 2 and "made for another base model" in g.stderr and g.stderr.count("\n") == 1, g.stderr
    with pytest.raises(model.ModelError, match="not a LoRA adapter|no adapter"):
        model.load(tiny_model_dir, lora=tiny_model_dir)


def _finetune(text_file, tmp_path, env, base, *extra):
    args = [FINETUNE, "--model", str(base), "--dataset", str(text_file), "--run_name", "r", "--chunk", str(CHUNK),
            "--seed", "1", "--batch_size", "2", "--lora", "2", "--learning_rate", "5e-3", *extra]
    return _run(args, env, tmp_path)


def test_cli_lora_ctrl_c_resume_continues_the_same_run(tiny_model_dir, text_file, tmp_path, env):
    # the whole run at once, --keep 1
    whole = tmp_path / "whole"
    whole.mkdir()
    r = _finetune(text_file, whole, env, tiny_model_dir, "--max_steps", "4", "--save_every", "2", "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert "tracing the training step" in r.stderr and "LoRA rank 2" in r.stderr
    run = whole / "checkpoint" / "r"
    assert sorted(p.name for p in run.glob("adapter-*.npz")) == ["adapter-4.npz"]
    assert "step 4: loss" in r.stdout
    # the same run, stopped with Ctrl-C after a first saved step, then resumed
    part = tmp_path / "part"
    part.mkdir()
    args = [sys.executable, FINETUNE, "--model", str(tiny_model_dir), "--dataset", str(text_file), "--run_name", "r",
            "--chunk", str(CHUNK), "--seed", "1", "--batch_size", "2", "--lora", "2", "--learning_rate", "5e-3",
            "--save_every", "1", "--max_steps", "1000"]
    p = subprocess.Popen(args, cwd=part, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    counter = part / "checkpoint" / "r" / "counter"
    try:
        deadline = time.monotonic() + 120
        while not counter.is_file() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # wait until a first step is saved
        assert p.poll() is None, p.communicate()[1]
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and "interrupted" in err and "Traceback" not in err, err
    from tasks import train as T
    stopped = T.latest_step(part / "checkpoint" / "r")
    assert 1 <= stopped
    if stopped < 4:
        r = _finetune(text_file, part, env, tiny_model_dir, "--max_steps", "4", "--save_every", "2", "--keep", "1")
        assert r.returncode == 0, r.stderr
        assert f"at step {stopped}" in r.stderr and "optimizer starts afresh" not in r.stderr
        a, b = lora.read_adapter(run), lora.read_adapter(part / "checkpoint" / "r")
        assert a.step == b.step == 4
        for n in a.a:
            np.testing.assert_allclose(b.a[n], a.a[n], atol=1e-6)
            np.testing.assert_allclose(b.b[n], a.b[n], atol=1e-6)
    # a LoRA run is not resumed as a full run (and the other way round): one line
    r = _run([FINETUNE, "--model", str(tiny_model_dir), "--dataset", str(text_file), "--run_name", "r",
              "--max_steps", "9"], env, whole)
    assert r.returncode == 2 and "holds a LoRA adapter run" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_bf16_training_tracks_fp32(tiny_model_dir, chunks):
    """bf16 products, float32 weights and Adam state: the loss stays within 1% of fp32's for 12 steps
    (full fine-tuning and LoRA over bfloat16 base matrices)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        m = model.load(tiny_model_dir)
        tr, runs[precision] = _train(m, chunks, 12, precision=precision, lr=2e-3)
        assert all(v.dtype.name == "float32" for v in tr.vars) and all(
            s.dtype.name == "float32" for s in tr.slots.values())
    np.testing.assert_allclose(runs["bf16"], runs["fp32"], rtol=0.01)
    assert runs["fp32"][-1] < runs["fp32"][0]
    base = model.load(tiny_model_dir, precision="bf16")
    _, lora_bf16 = _train(base, chunks, 12, adapter=lora.attach(base, rank=4), precision="bf16")
    m = model.load(tiny_model_dir)
    _, lora_fp32 = _train(m, chunks, 12, adapter=lora.attach(m, rank=4))
    np.testing.assert_allclose(lora_bf16, lora_fp32, rtol=0.01)
    assert lora_fp32[-1] < lora_fp32[0]
