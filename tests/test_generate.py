"""gpt2-generate.py and tasks.generate: goldens, properties, pipelines, errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

import model
from cli import generate as cli_generate
from cli.errors import UsageError
from tasks.errors import OptionError
from tasks.generate import GenerateOptions, Generator, TextAssembler
from model.npdecode import NumpyDecoder, cpu_weights
from tasks.sampling import SamplingParams, choose, top_k_filter, top_p_filter

from conftest import ROOT, spawn

SCRIPT = str(ROOT / "gpt2-generate.py")


@pytest.fixture(scope="module")
def records(golden):
    with open(golden / "tiny" / "generate.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _main(argv, capsys):
    """Run the CLI in this process (TensorFlow is loaded once for all tests)."""
    assert cli_generate.main(argv) == 0
    return capsys.readouterr()


def _cli(args, env, stdin=None, timeout=180):
    return subprocess.run([sys.executable, SCRIPT, *args], input=stdin, capture_output=True, env=env,
                          cwd=ROOT, timeout=timeout)


# -- goldens ------------------------------------------------------------------------


def test_golden_stdout_every_record(records, tiny_model_dir, env, capsys):
    assert len(records) == 13
    for r in records:
        out = _main(["--model", str(tiny_model_dir), "--gpu", "-1", *r["args"]], capsys)
        assert out.out == r["stdout"], r["args"]


def test_golden_stdout_through_the_script(records, tiny_model_dir, env):
    for r in (records[0], records[1], records[-1]):
        p = _cli(["--model", str(tiny_model_dir), "--gpu", "-1", *r["args"]], env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.decode("utf-8") == r["stdout"]
        assert p.stderr == b""  # TensorFlow's chatter is silenced


def test_golden_with_tensorflow_engine(records, tiny, enc):
    gen = Generator(tiny, enc, engine="tf")
    for r in records[:2]:
        a = dict(zip(r["args"][::2], r["args"][1::2]))
        opts = GenerateOptions(top_k=1, max_length=int(a["--max_length"]), min_length=int(a.get("--min_length", 0)))
        texts = gen.generate(a["--context"], int(a["--num_generate"]), opts)
        assert "\n========\n".join(texts) + "\n" == r["stdout"]


# -- the decoding engines -------------------------------------------------------------


def test_numpy_weights_are_views_not_copies(tiny):
    weights = cpu_weights(tiny)
    assert not weights["model/wte"].flags["OWNDATA"]


@pytest.mark.parametrize("rows", [2, 6])
def test_row_strategies_equal_plain_matrix_product(tiny, enc, rows):
    """A few rows take one matrix-vector product each, some row counts are
    padded with zero rows; either way the result is the plain product's."""
    from model import npdecode

    ids = [enc.encode("明日も晴れるかな")[:5]] * rows
    tokens = list(range(3, 3 + rows))
    dec = NumpyDecoder(tiny.hparams, cpu_weights(tiny))
    dec.add(range(rows), ids)
    tuned = dec.step(range(rows), tokens)
    limit, pad = npdecode.ROWS_AS_VECTORS, npdecode.PAD_ROWS
    try:
        npdecode.ROWS_AS_VECTORS, npdecode.PAD_ROWS = 0, {}
        for r in range(rows):
            dec.truncate(r, 5)
        plain = dec.step(range(rows), tokens)
    finally:
        npdecode.ROWS_AS_VECTORS, npdecode.PAD_ROWS = limit, pad
    np.testing.assert_allclose(tuned, plain, atol=1e-5)


def test_identical_rows_are_prefilled_once(tiny, enc):
    dec = NumpyDecoder(tiny.hparams, cpu_weights(tiny))
    ids = enc.encode("今日は")
    logits = dec.add(range(3), [ids, ids, ids])
    assert dec.prefilled_tokens == len(ids) and dec.rows == 3
    np.testing.assert_array_equal(logits[0], logits[2])
    out = dec.step(range(3), [1, 2, 3])  # the rows do not share their caches
    np.testing.assert_allclose(out[2], tiny.logits([ids + [3]])[0, -1], atol=1e-4)


def _small_ctx_model(n_ctx=24):
    hp = model.HParams(n_vocab=20573, n_ctx=n_ctx, n_embd=32, n_head=2, n_layer=2)
    return model.Model.from_weights(model.random_weights(hp, seed=3), hparams=hp)


def _record_feeding(engine, fed):
    """Record what the engine is fed: ("start", window) for prefills, ("step", token) for steps."""
    real_add, real_step, real_replace = engine.add, engine.step, engine.replace

    def add(ids, seqs):
        fed.extend(("start", list(s)) for s in seqs)
        return real_add(ids, seqs)

    def step(ids, tokens):
        fed.extend(("step", int(t)) for t in np.asarray(tokens).reshape(-1))
        return real_step(ids, tokens)

    def replace(seq_id, window):
        fed.append(("start", list(window)))
        return real_replace(seq_id, window)

    engine.add, engine.step, engine.replace = add, step, replace


def test_sliding_window_past_the_context(enc):
    m = _small_ctx_model()
    gen = Generator(m, enc)
    fed = []
    _record_feeding(gen.engine(), fed)
    text = gen.generate("今日は", 1, GenerateOptions(temperature=0, max_length=200))[0]
    windows = [w for kind, w in fed if kind == "start"]
    assert len(windows) >= 2  # restarted from the window at least once
    assert len(windows[1]) == m.hparams.n_ctx // 2
    assert len(text) > 0


@pytest.mark.parametrize("engine", ["numpy", "tf"])
def test_sliding_window_continues_from_the_recent_tokens(enc, engine):
    m = _small_ctx_model(n_ctx=16)
    gen = Generator(m, enc, engine=engine)
    fed = []  # ("start", window) and ("step", token) in order
    _record_feeding(gen.engine(), fed)
    gen.generate("今日は", 1, GenerateOptions(temperature=0, max_length=80))
    windows = [w for kind, w in fed if kind == "start"]
    assert len(windows) >= 3
    seen = []
    for kind, value in fed:
        if kind == "start":
            if seen:
                # the new window is the most recent n_ctx/2 tokens, ending with the token just drawn
                assert value[:-1] == seen[-(m.hparams.n_ctx // 2) + 1:]
                assert len(value) == m.hparams.n_ctx // 2
            seen = list(value)
        else:
            seen.append(value)
        assert len(seen) <= m.hparams.n_ctx


# -- sampling ---------------------------------------------------------------------------


def _rows(tiny, enc, n=20):
    ids = enc.encode("今日は良い天気です。明日も晴れるかな。江戸時代のインターネット回線")[:n]
    return tiny.logits([ids])[0]


def test_top_k_draws_only_the_k_best(tiny, enc):
    rng = np.random.default_rng(0)
    params = SamplingParams(top_k=5)
    for logits in _rows(tiny, enc):
        allowed = set(np.argsort(-logits)[:5].tolist())
        for _ in range(30):
            assert choose(logits, params, rng) in allowed


def test_top_k_keeps_ties():
    logits = np.array([1.0, 3.0, 2.0, 2.0, 0.5], np.float32)
    kept = top_k_filter(logits, 2)
    assert (kept > -1e9).tolist() == [False, True, True, True, False]


def test_top_p_keeps_smallest_set_by_exclusive_cumulative_probability():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    kept = lambda p: (top_p_filter(logits, p) > -1e9).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]  # exclusive sums 0, .5, .8, .95
    assert kept(0.51) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1e-9) == [True, False, False, False]  # always at least one


def test_top_p_draws_only_inside_the_nucleus(tiny, enc):
    rng = np.random.default_rng(1)
    params = SamplingParams(top_k=0, top_p=0.3)
    for logits in _rows(tiny, enc, 10):
        allowed = set(np.flatnonzero(top_p_filter(logits, 0.3) > -1e9).tolist())
        for _ in range(30):
            assert choose(logits, params, rng) in allowed


def test_forbidden_token_never_drawn(enc):
    rng = np.random.default_rng(2)
    logits = np.zeros(len(enc), np.float32)
    logits[enc.eos_id] = 10.0  # by far the most likely
    for params in (SamplingParams(top_k=40), SamplingParams(top_k=1), SamplingParams(temperature=0)):
        for _ in range(50):
            assert choose(logits, params, rng, forbid=enc.eos_id) != enc.eos_id


def test_min_length_blocks_end_of_text(tiny, enc):
    gen = Generator(tiny, enc)
    eos_steps = []
    engine = gen.engine()
    real_step, real_add = engine.step, engine.add
    # make <|endoftext|> the most likely token at every step
    def step(ids, tokens):
        out = real_step(ids, tokens)
        out[:, enc.eos_id] = out.max() + 5.0
        eos_steps.append(1)
        return out
    def add(ids, seqs):
        out = real_add(ids, seqs)
        out[:, enc.eos_id] = out.max() + 5.0
        return out
    engine.step, engine.add = step, add
    texts = gen.generate("今日は", 3, GenerateOptions(top_k=1, min_length=7, max_length=1000, seed=1))
    # seven tokens drawn (one after the prefill, six after steps), then <|endoftext|>
    assert len(eos_steps) == 7
    assert all(texts)


def test_temperature_zero_is_greedy(tiny, enc):
    gen = Generator(tiny, enc)
    a = gen.generate("明日も晴れるかな", 2, GenerateOptions(temperature=0, max_length=40, seed=1))
    b = gen.generate("明日も晴れるかな", 1, GenerateOptions(top_k=1, max_length=40, seed=2))
    assert a == [b[0], b[0]]


def test_sampling_params_validate():
    with pytest.raises(ValueError):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-0.1)


# -- seeds, batches, streaming ------------------------------------------------------------


def test_same_seed_same_samples(tiny, enc):
    gen = Generator(tiny, enc)
    opts = GenerateOptions(top_k=40, max_length=60, seed=7)
    assert gen.generate("今日は", 3, opts) == gen.generate("今日は", 3, opts)
    other = gen.generate("今日は", 3, GenerateOptions(top_k=40, max_length=60, seed=8))
    assert other != gen.generate("今日は", 3, opts)


def test_batch_equals_single_samples(tiny, enc):
    gen = Generator(tiny, enc)
    opts = GenerateOptions(top_k=20, max_length=50, seed=11)
    batch = gen.generate("江戸時代の", 4, opts)
    singles = [gen.generate("江戸時代の", 1, opts, first=i)[0] for i in range(4)]
    assert batch == singles
    assert len(set(batch)) > 1


CONTEXTS = ["江戸時代の", "今日は良い天気です。明日も晴れるかな", "", "文字列をフォント '0' の変換テーブルとして使用する。"]


@pytest.mark.parametrize("batch_size,engine", [(1, "numpy"), (3, "numpy"), (16, "numpy"), (16, "tf"), (16, "onnx")])
def test_contexts_batched_together_equal_separate_runs(tiny, enc, batch_size, engine):
    """Samples of several contexts share batches (rows of different lengths,
    joining as others finish); every sample is what a run of its context alone gives."""
    gen = Generator(tiny, enc, engine=engine)
    opts = GenerateOptions(top_k=20, max_length=40, seed=5, min_length=3)
    many = list(gen.generate_many(iter(CONTEXTS), 3, opts, batch_size=batch_size))
    assert [(s.context_index, s.context, s.index) for s in many] == [
        (j, c, i) for j, c in enumerate(CONTEXTS) for i in range(3)]
    for j, context in enumerate(CONTEXTS):
        alone = gen.generate(context, 3, opts, context_index=j)
        assert [s.text for s in many if s.context_index == j] == alone


@pytest.mark.parametrize("engine", ["numpy", "tf", "onnx"])
def test_contexts_batched_with_sliding_windows_equal_separate_runs(enc, engine):
    """Rows of different lengths slide their windows at different steps, each as it would alone."""
    m = _small_ctx_model(n_ctx=16)
    gen = Generator(m, enc, engine=engine)
    opts = GenerateOptions(top_k=5, max_length=60, seed=2)
    contexts = ["今日は", "江戸時代のインターネット回線は", "あ"]
    many = list(gen.generate_many(contexts, 2, opts, batch_size=4))
    for j, context in enumerate(contexts):
        assert [s.text for s in many if s.context_index == j] == gen.generate(context, 2, opts, context_index=j)


def test_auto_engine_is_float32_onnx_runtime_on_a_cpu(tiny, enc):
    """'auto' on a CPU decodes float32 with ONNX Runtime at every row count (measured faster than
    numpy at 1 and 8 rows), with the greedy text of the numpy reference; an engine asked for is kept."""
    opts = GenerateOptions(top_k=1, max_length=60)
    one = Generator(tiny, enc)
    texts = one.generate("今日は", 1, opts)
    assert one.engine_name == "onnx" and one.engine().engine == "onnx" and one.engine().quantize is None
    assert Generator(tiny, enc, engine="numpy").generate("今日は", 3, opts) == texts * 3
    asked = Generator(tiny, enc, engine="numpy")
    asked.generate("今日は", 8, opts)
    assert asked.engine_name == "numpy"
    for rows in (None, 1, 8):
        assert model.choose_engine(tiny, "auto", rows=rows) == "onnx"
    assert model.decoder(tiny).engine == "onnx"


def test_auto_engine_is_numpy_without_room_for_a_second_copy(tiny, enc, monkeypatch):
    from model import decoding

    need = 2 * 4 * tiny.hparams.n_params
    monkeypatch.setattr(decoding, "available_memory", lambda: need - 1)
    assert model.choose_engine(tiny, "auto") == "numpy"
    gen = Generator(tiny, enc)
    gen.generate("今日は", 4, GenerateOptions(top_k=1, max_length=20))
    assert gen.engine_name == "numpy"
    monkeypatch.setattr(decoding, "available_memory", lambda: need)
    assert model.choose_engine(tiny, "auto") == "onnx"
    monkeypatch.setattr(decoding, "available_memory", lambda: None)  # unknown: as there is room
    assert model.choose_engine(tiny, "auto") == "onnx"


def test_contexts_with_the_tensorflow_engine(tiny, enc):
    opts = GenerateOptions(top_k=1, max_length=30, seed=1, min_length=4)
    tf_many = [s.text for s in Generator(tiny, enc, engine="tf").generate_many(CONTEXTS[:2], 2, opts, batch_size=3)]
    np_many = [s.text for s in Generator(tiny, enc).generate_many(CONTEXTS[:2], 2, opts, batch_size=3)]
    assert tf_many == np_many


def test_contexts_are_read_lazily(tiny, enc):
    gen = Generator(tiny, enc)
    pulled = []

    def contexts():
        for c in ("今日は", "明日は", "昨日は"):
            pulled.append(c)
            yield c

    opts = GenerateOptions(top_k=1, max_length=10, seed=1)
    samples = gen.generate_many(contexts(), 1, opts, batch_size=8, read_ahead=False)
    first = next(samples)
    assert first.context == "今日は" and pulled == ["今日は"]  # answered before the next line is read
    assert [s.context for s in samples] == ["明日は", "昨日は"]
    pulled.clear()
    list(gen.generate_many(contexts(), 1, opts, batch_size=8))
    assert pulled == ["今日は", "明日は", "昨日は"]


def test_empty_samples_are_drawn_again(tiny, enc):
    """A sample that ends at once is drawn again (as the original does), up to 8 more times."""
    from tasks.generate import RETRIES_FOR_EMPTY

    gen = Generator(tiny, enc)
    engine = gen.engine()
    real_add = engine.add
    prefills = []

    def add(ids, seqs):
        out = real_add(ids, seqs)
        prefills.append(len(seqs))
        out[:, enc.eos_id] = out.max() + 50.0  # <|endoftext|> first: an empty sample
        return out

    engine.add = add
    texts = gen.generate("今日は", 2, GenerateOptions(top_k=1, max_length=20, seed=1))
    assert texts == ["", ""]
    assert sum(prefills) == 2 * (RETRIES_FOR_EMPTY + 1)


def test_cli_batch_size_does_not_change_the_output(tiny_model_dir, tmp_path, env, capsys):
    contexts = tmp_path / "contexts.txt"
    contexts.write_text("\n".join(CONTEXTS) + "\n", encoding="utf-8")
    base = ["--model", str(tiny_model_dir), "--gpu", "-1", "--contexts", str(contexts), "--num_generate", "2",
            "--max_length", "30", "--seed", "9"]
    outs = {n: _main(base + ["--batch_size", n], capsys).out for n in ("1", "5", "16")}
    assert outs["1"] == outs["5"] == outs["16"]
    assert outs["1"].count("========") == 2 * len(CONTEXTS) - 1


def test_text_assembler_holds_back_partial_characters(enc):
    ids = enc.encode("a\U000e0100b😀")  # a character that only exists as byte tokens
    asm = TextAssembler(enc)
    pieces = [asm.push(i) for i in ids] + [asm.finish()]
    assert "".join(pieces) == enc.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stream_equals_plain_output(tiny_model_dir, env, capsys):
    base = ["--model", str(tiny_model_dir), "--gpu", "-1", "--num_generate", "1", "--max_length", "60",
            "--seed", "5", "--context", "今日は"]
    plain = _main(base, capsys).out
    streamed = _main(base + ["--stream"], capsys).out
    assert streamed == plain and len(plain) > 10


def test_cli_seed_reproducible(tiny_model_dir, env, capsys):
    args = ["--model", str(tiny_model_dir), "--gpu", "-1", "--num_generate", "2", "--max_length", "40", "--seed", "3"]
    assert _main(args, capsys).out == _main(args, capsys).out


# -- pipelines ------------------------------------------------------------------------------


def test_jsonl_and_contexts_file(tiny_model_dir, tmp_path, env, capsys, records):
    args = dict(zip(records[0]["args"][::2], records[0]["args"][1::2]))
    assert args["--num_generate"] == "2" and "--min_length" not in args
    contexts = tmp_path / "contexts.txt"
    contexts.write_text(args["--context"] + "\n明日も晴れるかな\n", encoding="utf-8")
    out = _main(["--model", str(tiny_model_dir), "--gpu", "-1", "--contexts", str(contexts), "--num_generate", "2",
                 "--top_k", "1", "--max_length", args["--max_length"], "--format", "jsonl"], capsys).out
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["context"], r["index"]) for r in rows] == [
        (args["--context"], 0), (args["--context"], 1), ("明日も晴れるかな", 0), ("明日も晴れるかな", 1)]
    assert rows[0]["text"] + "\n========\n" + rows[1]["text"] + "\n" == records[0]["stdout"]


def test_contexts_typed_on_a_terminal_are_answered_one_by_one(tiny_model_dir, env):
    import os
    import pty
    import select

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, SCRIPT, "--model", str(tiny_model_dir), "--gpu", "-1", "--contexts", "-",
                          "--num_generate", "2", "--max_length", "20", "--seed", "1", "--format", "jsonl"],
                         stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    os.close(slave)
    try:
        os.write(master, "今日は\n".encode("utf-8"))
        ready, _, _ = select.select([p.stdout], [], [], 120)
        assert ready, "no answer before the next line was typed"
        assert json.loads(p.stdout.readline())["context"] == "今日は"
        assert json.loads(p.stdout.readline())["index"] == 1
        os.write(master, "明日は\n".encode("utf-8") + b"\x04")  # a second line, then Ctrl-D
        rest = p.stdout.read().decode("utf-8").splitlines()
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    assert p.returncode == 0, p.stderr.read()
    assert [json.loads(line)["context"] for line in rest] == ["明日は", "明日は"]


def test_context_from_stdin(tiny_model_dir, env, records):
    r = records[0]
    args = [a for a in r["args"]]
    context = args[args.index("--context") + 1]
    args[args.index("--context") + 1] = "-"
    p = _cli(["--model", str(tiny_model_dir), "--gpu", "-1", *args], env, stdin=(context + "\n").encode("utf-8"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode("utf-8") == r["stdout"]


def test_output_file_written_atomically(tiny_model_dir, tmp_path, env, capsys, records):
    target = tmp_path / "out.txt"
    r = records[0]
    out = _main(["--model", str(tiny_model_dir), "--gpu", "-1", "--output_file", str(target), *r["args"]], capsys)
    assert out.out == ""
    assert target.read_text(encoding="utf-8") == r["stdout"]
    # a run that fails half-way leaves the previous file as it was, and no temporary file
    bad = tmp_path / "contexts.txt"
    bad.write_bytes("今日は\n".encode() + b"\xff\xfe\n")
    with pytest.raises(UsageError, match="line 2: invalid UTF-8"):
        cli_generate.main(["--model", str(tiny_model_dir), "--gpu", "-1", "--contexts", str(bad),
                           "--output_file", str(target), "--num_generate", "1", "--max_length", "10"])
    assert target.read_text(encoding="utf-8") == r["stdout"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contexts.txt", "out.txt"]


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--top_k", "-1"], "--top_k must not be negative"),
    (["--top_p", "1.5"], "--top_p must be between 0 and 1"),
    (["--min_p", "1.5"], "--min_p must be between 0 and 1"),
    (["--temperature", "-1"], "--temperature must be positive"),
    (["--stream", "--num_generate", "2"], "--stream prints one sample"),
    (["--context", "x", "--contexts", "-"], "exclusive"),
])
def test_usage_errors_before_loading(args, message):
    """Flag values are refused before the model is looked for (--model does not exist here)."""
    from cli.errors import message as error_line
    from tasks.errors import OptionError

    with pytest.raises((UsageError, OptionError)) as e:
        cli_generate.main(["--model", "/nonexistent", *args])
    assert message in error_line(e.value)


def test_min_length_too_large(tiny_model_dir, env):
    from tasks.errors import OptionError

    with pytest.raises(OptionError, match="min_length must be below n_ctx/2 = 512"):
        cli_generate.main(["--model", str(tiny_model_dir), "--gpu", "-1", "--min_length", "512"])


def test_ctrl_c_ends_quietly(tiny_model_dir, env):
    import signal

    p = spawn([sys.executable, SCRIPT, "--model", str(tiny_model_dir), "--gpu", "-1", "--num_generate",
               "1", "--max_length", "100000", "--min_length", "500", "--stream", "--seed", "1"],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    assert p.stdout.read(3)  # it is generating
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err


# -- the benchmark's timed loops ---------------------------------------------------------------


def test_bench_loops_time_real_steps(tiny, enc):
    """bench/bench_generate.py's measures run against the current engine interface."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dec = NumpyDecoder(tiny.hparams, cpu_weights(tiny))
    runs = {"generate 2 samples": (bench.generate_measure(tiny, enc, 2, 4), 2 * 4),
            "8 contexts": (bench.contexts_measure(tiny, enc, 4), 8 * 4),
            "decoder steps": (bench.decode_measure(dec, tiny.hparams, 2, 8, 4), 2 * 4)}
    for name, (measure, tokens) in runs.items():
        timed = measure()
        assert timed.tokens == tokens and timed.seconds > 0, name
    assert dec.lengths() == [8 + 4, 8 + 4]  # the decoder really took the timed steps


def test_contexts_read_lazily_are_not_refused_for_rows_never_used(tiny, enc, monkeypatch):
    """--contexts FILE (a length not known up front) with a --batch_size far beyond the memory: memory is
    checked as the batch grows, and the batch stays at the rows the memory holds; the samples are those
    of a small batch_size."""
    from tasks import memory

    hp = tiny.hparams
    per_row = 2 * 4 * hp.n_layer * hp.n_ctx * hp.n_embd
    opts = GenerateOptions(top_k=20, seed=3, max_length=30)
    ref = [s.text for s in Generator(tiny, enc).generate_many(CONTEXTS[:3], 2, opts, batch_size=4)]
    monkeypatch.setattr(memory, "available_memory", lambda: 5 * per_row)
    with pytest.raises(OptionError, match="batch_size"):
        list(Generator(tiny, enc).generate_many(CONTEXTS[:3], 2, opts, batch_size=1000))  # known: 6 rows
    lazy = Generator(tiny, enc)
    got = [s.text for s in lazy.generate_many(iter(CONTEXTS[:3]), 2, opts, batch_size=1000)]
    assert got == ref
