"""--precision bf16: bfloat16 block matrices for the batched forward passes (vectors, scores).

The float32 path is the one the goldens check (test_transform.py, test_score.py);
here: bf16 stays close to it, fp32 stays exactly itself, and the flag works end to
end in both tools.
"""
import io
import json
import subprocess
import sys

import numpy as np
import pytest

import model
from cli import bulk as cli_bulk
from cli import flags
from cli import score as cli_score
from cli import transform as cli_transform
from tasks.errors import OptionError
from tasks.score import Scorer
from tasks.vectors import Vectorizer

from conftest import ROOT

TRANSFORM = str(ROOT / "gpt2-transform.py")
SCORE = str(ROOT / "gpt2-score.py")
MATRICES = ("attn/c_attn/w", "attn/c_proj/w", "mlp/c_fc/w", "mlp/c_proj/w")

#: The issue's bar for vectors: cosine similarity to the float32 vector.
MIN_COSINE = 0.999
#: Scores.  bfloat16 keeps 8 significant bits, so every input and output of a block's matrix
#: product is rounded by up to 2**-9 (0.2%) relative; the roundings are independent and mostly
#: cancel in the sums, and the output projection and log-softmax are float32.  On the tiny
#: model the measured differences are at most 0.046 nat per token (rms 0.015) and 0.07% of a
#: line's sum.  Bars: 0.1 nat per token (a probability within 10%) and 0.5% of a line's
#: log-probability -- a few times the measured error, far below what a wrong weight, a wrong
#: layer or a float32/bfloat16 mix-up gives (several nats per token).
MAX_TOKEN_DIFF = 0.1
MAX_LINE_REL_DIFF = 5e-3


@pytest.fixture(autouse=True)
def emulated_where_needed(monkeypatch):
    """bf16's numbers are checked on every CPU: where its products would be emulated the tools
    run fp32 unless asked (tested below without this), so the tests ask."""
    monkeypatch.setenv(flags.EMULATE_BF16, "1")


@pytest.fixture(scope="module")
def records(golden):
    with open(golden / "tiny" / "transform.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def texts(golden):
    lines = (golden / "contexts.txt").read_text(encoding="utf-8").splitlines()
    return [t.strip() for t in lines if t.strip()]


@pytest.fixture(scope="module")
def tiny_bf16(tiny):
    return tiny.with_precision("bf16")


def _cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _base(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--gpu", "-1"]


# -- the model --------------------------------------------------------------------------------


def test_bf16_model_holds_bfloat16_matrices_once(tiny, tiny_bf16, tiny_model_dir):
    import tensorflow as tf

    assert tiny.precision == "fp32" and tiny_bf16.precision == "bf16"
    assert tiny.with_precision("fp32") is tiny and tiny_bf16.with_precision("bf16") is tiny_bf16
    loaded = model.load(tiny_model_dir, precision="bf16")
    for m in (tiny_bf16, loaded):
        for name, var in m.variables.items():
            matrix = name.endswith(tuple(MATRICES))
            assert var.dtype == (tf.bfloat16 if matrix else tf.float32), name
            if not matrix and m is tiny_bf16:
                assert var is tiny.variables[name]  # shared, not copied
    for name, var in tiny.variables.items():
        assert var.dtype == tf.float32, name  # the float32 model is left as it was

    def nbytes(m):
        return sum(int(np.prod(v.shape)) * v.dtype.size for v in m.variables.values())

    matrices = sum(int(np.prod(v.shape)) * 4 for n, v in tiny.variables.items() if n.endswith(tuple(MATRICES)))
    assert nbytes(loaded) == nbytes(tiny) - matrices // 2
    ids = [[1, 2, 3, 4, 5], [6, 7]]
    np.testing.assert_array_equal(loaded.hidden(ids), tiny_bf16.hidden(ids))
    assert "precision='bf16'" in repr(loaded) and "precision" not in repr(tiny)


def test_bf16_outputs_are_float32_and_close(tiny, tiny_bf16, enc, records):
    ids = [enc.encode(r["context"]) for r in records[:4]]
    for fn in ("hidden", "logits"):
        want, got = getattr(tiny, fn)(ids), getattr(tiny_bf16, fn)(ids)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert not np.array_equal(got, want)  # bfloat16 products really ran
        lens = [len(i) for i in ids]
        for row, n in enumerate(lens):
            assert (_cosines(got[row, :n], want[row, :n]) >= MIN_COSINE).all()
            assert (got[row, n:] == 0).all()  # padding stays zero
    # prefill and step run the same block
    cache, last = tiny_bf16.start(ids[:1])
    np.testing.assert_allclose(last[0], tiny_bf16.logits(ids[:1])[0, -1], atol=1e-4)
    nxt = tiny_bf16.step(cache, [5])
    np.testing.assert_allclose(nxt[0], tiny_bf16.logits([ids[0] + [5]])[0, -1], atol=1e-4)


def test_fp32_graph_has_no_bfloat16(tiny, tiny_bf16):
    """The float32 forward pass is traced as before: no cast, no bfloat16 anywhere in it."""
    import tensorflow as tf

    def ops(m):
        fn = tf.function(m.graph_hidden).get_concrete_function(tf.TensorSpec([None, None], tf.int32))
        return fn.graph.as_graph_def().node

    assert not [n.name for n in ops(tiny) if "bfloat16" in str(n.attr).lower() or n.op == "Cast"]
    assert [n for n in ops(tiny_bf16) if n.op == "MatMul" and n.attr["T"].type == tf.bfloat16.as_datatype_enum]


def test_model_refusals(tiny, tiny_bf16, tiny_model_dir, tmp_path):
    with pytest.raises(model.ModelError, match="precision must be one of fp32, bf16, got 'fp16'"):
        tiny.with_precision("fp16")
    with pytest.raises(model.ModelError, match="precision must be one of fp32, bf16"):
        model.load(tiny_model_dir, precision="float16")
    with pytest.raises(model.ModelError, match="cannot give fp32 results"):
        tiny_bf16.with_precision("fp32")
    with pytest.raises(model.ModelError, match="lost the checkpoint's float32 values"):
        model.save(tiny_bf16, tmp_path / "out", step=1)
    assert model.PRECISIONS == ("fp32", "bf16")


# -- vectors and scores -----------------------------------------------------------------------


def test_bf16_vectors_within_cosine_of_the_goldens(tiny, enc, records):
    id_lists = [enc.encode(r["context"]) for r in records]
    golden = np.array([r["vector"] for r in records])
    fp32 = Vectorizer(tiny, enc).vectors_of_ids(id_lists)
    for pooling in ("last", "mean"):
        for layer in (-1, 0):
            want = Vectorizer(tiny, enc, pooling=pooling, layer=layer).vectors_of_ids(id_lists)
            vec = Vectorizer(tiny, enc, pooling=pooling, layer=layer, precision="bf16")
            assert vec.model.precision == "bf16"
            got = vec.vectors_of_ids(id_lists)
            assert got.dtype == np.float32 and got.shape == want.shape
            cos = _cosines(got, want)
            assert cos.min() >= MIN_COSINE, (pooling, layer, cos.min())
            assert not np.array_equal(got, want)
    bf16 = Vectorizer(tiny, enc, precision="bf16").vectors_of_ids(id_lists)
    assert _cosines(bf16, golden).min() >= MIN_COSINE
    np.testing.assert_allclose(fp32, golden, atol=1e-4)  # and float32 is still the golden


def test_fp32_is_the_default_path(tiny, enc, records, texts):
    vec = Vectorizer(tiny, enc, precision="fp32")
    assert vec.model is tiny and Vectorizer(tiny, enc).model is tiny
    id_lists = [enc.encode(r["context"]) for r in records]
    np.testing.assert_array_equal(vec.vectors_of_ids(id_lists), Vectorizer(tiny, enc).vectors_of_ids(id_lists))
    scorer = Scorer(tiny, enc, precision="fp32")
    assert scorer.model is tiny
    assert [s.logprob for s in scorer.score(texts)] == [s.logprob for s in Scorer(tiny, enc).score(texts)]


def test_bf16_scores_close_to_fp32(tiny, enc, texts):
    fp32 = Scorer(tiny, enc).score(texts)
    scorer = Scorer(tiny, enc, precision="bf16")
    assert scorer.model.precision == "bf16"
    bf16 = scorer.score(texts)
    assert [s.text for s in bf16] == texts and [s.ids for s in bf16] == [s.ids for s in fp32]
    token_diffs = np.concatenate([a.logprobs - b.logprobs for a, b in zip(bf16, fp32)])
    assert np.abs(token_diffs).max() <= MAX_TOKEN_DIFF
    assert np.abs(token_diffs).max() > 0  # bfloat16 products really ran
    for a, b in zip(bf16, fp32):
        assert abs(a.logprob - b.logprob) <= MAX_LINE_REL_DIFF * abs(b.logprob), (a.text, a.logprob, b.logprob)
    # the order of the candidates, what ranking uses, is the same here
    assert np.argsort([s.logprob for s in bf16]).tolist() == np.argsort([s.logprob for s in fp32]).tolist()


def test_a_bf16_model_given_to_the_tasks(tiny_bf16, enc, texts):
    assert Vectorizer(tiny_bf16, enc).model is tiny_bf16  # None: the model's own precision
    assert Scorer(tiny_bf16, enc, precision="bf16").model is tiny_bf16
    with pytest.raises(model.ModelError, match="cannot give fp32 results"):
        Scorer(tiny_bf16, enc, precision="fp32")


@pytest.mark.parametrize("make", [lambda m, e, p: Vectorizer(m, e, precision=p),
                                  lambda m, e, p: Scorer(m, e, precision=p)], ids=["Vectorizer", "Scorer"])
def test_unknown_precision_is_an_option_error(tiny, enc, make):
    for bad in ("fp16", "BF16", "", 16):
        with pytest.raises(OptionError, match="precision must be one of fp32, bf16") as e:
            make(tiny, enc, bad)
        assert e.value.option == "precision"


# -- the tools ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tool,extra", [(cli_transform, []), (cli_score, ["-"])])
def test_the_tools_load_bf16_matrices_directly(tool, extra, tiny_model_dir):
    """--precision bf16 reads the block matrices as bfloat16 (model.load(..., precision='bf16')): the
    float32 matrices are never all in memory; fp32 loads them as they are."""
    from cli import common

    for precision in ("bf16", "fp32"):
        args = tool.parser().parse_args(["--model", str(tiny_model_dir), "--gpu", "-1", "--precision", precision,
                                         *extra])
        m = common.load_model(args)
        assert m.precision == precision
        assert m.variables["model/h0/mlp/c_fc/w"].dtype.name == ("bfloat16" if precision == "bf16" else "float32")


def test_transform_flag_end_to_end(records, tiny_model_dir, tmp_path, env, capsys):
    text = records[3]["context"]
    assert cli_transform.main(_base(tiny_model_dir) + ["--context", text, "--precision", "bf16"]) == 0
    out = capsys.readouterr()
    vector = json.loads(out.out)
    assert len(vector) == 64
    assert out.out == "[" + ", ".join(repr(float(np.float32(v))) for v in vector) + "]\n"  # the original's format
    assert _cosines(vector, records[3]["vector"]) >= MIN_COSINE
    assert vector != records[3]["vector"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(r["context"] for r in records) + "\n", encoding="utf-8")
    for spelling in (["--precision", "bf16"], ["--precision=bf16"]):
        assert cli_transform.main(_base(tiny_model_dir) + ["--input", str(src), "--format", "jsonl", *spelling]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["text"] for r in rows] == [r["context"] for r in records]
        assert _cosines([r["vector"] for r in rows], [r["vector"] for r in records]).min() >= MIN_COSINE


def test_fp32_flag_output_is_byte_identical(records, tiny_model_dir, tmp_path, env, capsys, texts):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    for main, args in ((cli_transform.main, ["--input", str(src), "--format", "tsv"]),
                       (cli_score.main, ["--tokens", str(src)])):
        assert main(_base(tiny_model_dir) + args) == 0
        default = capsys.readouterr().out
        assert main(_base(tiny_model_dir) + args + ["--precision", "fp32"]) == 0
        assert capsys.readouterr().out == default


def test_score_flag_end_to_end(tiny, enc, texts, tiny_model_dir, tmp_path, env, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert cli_score.main(_base(tiny_model_dir) + ["--precision", "bf16", str(src)]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = Scorer(tiny, enc).score(texts)
    assert len(lines) == len(texts)
    for line, w in zip(lines, want):
        text, number = line.split("\t")
        assert text == w.text
        assert number == "%.5g" % float(number)  # the original's %.5g
        assert abs(float(number) - w.logprob) <= MAX_LINE_REL_DIFF * abs(w.logprob)
    assert cli_score.main(_base(tiny_model_dir) + ["--precision", "bf16", "--format", "jsonl", "--tokens",
                                                   str(src)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(r) for r in records] == [{"text", "logprob", "tokens", "perplexity", "token_logprobs"}] * len(texts)
    for r, w in zip(records, want):
        got = np.array([t["logprob"] for t in r["token_logprobs"]])
        assert np.abs(got - w.logprobs).max() <= MAX_TOKEN_DIFF


@pytest.mark.parametrize("script,args", [(TRANSFORM, ["--context", "今日は"]), (SCORE, ["-"])],
                         ids=["transform", "score"])
def test_through_the_scripts(script, args, tiny_model_dir, env):
    p = subprocess.run([sys.executable, script, *_base(tiny_model_dir), "--precision", "bf16", *args],
                       input="今日は良い天気です。\n".encode(), capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.decode().splitlines()) == 1
    # nothing on stderr: the CPU multiplies bfloat16 itself, or the emulation was asked for
    assert p.stderr == b""


@pytest.mark.parametrize("script,args", [(TRANSFORM, ["--context", "x"]), (SCORE, ["-"])], ids=["transform", "score"])
@pytest.mark.parametrize("value", ["fp16", "BF16", ""])
def test_bad_value_is_one_line_and_status_2(script, args, value, tiny_model_dir, env):
    p = subprocess.run([sys.executable, script, *_base(tiny_model_dir), *args, "--precision", value],
                       input=b"x\n", capture_output=True, env=env, cwd=ROOT, timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 2 and p.stdout == b""
    assert len(err.strip().splitlines()) == 1, err
    prog = script.rsplit("/", 1)[1]
    assert err.startswith(f"{prog}: error: argument --precision: invalid choice: '{value}' (choose from "
                          f"'fp32', 'bf16')"), err


@pytest.mark.parametrize("main,args", [(cli_transform.main, ["--context", "今日は"]),
                                       (cli_score.main, ["--tokens", "-"])], ids=["transform", "score"])
def test_where_bfloat16_is_emulated_the_tools_run_fp32(main, args, tiny_model_dir, env, capsys, monkeypatch):
    monkeypatch.setattr(model, "bf16_native", lambda device="/CPU:0": False)
    monkeypatch.delenv(flags.EMULATE_BF16)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("今日は\n".encode())))
    base = _base(tiny_model_dir) + args
    assert main(base) == 0
    fp32 = capsys.readouterr()
    assert fp32.err == ""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("今日は\n".encode())))
    assert main(base + ["--precision", "bf16"]) == 0
    out = capsys.readouterr()
    assert out.out == fp32.out  # fp32's numbers exactly: the emulation is not run
    warning, = out.err.splitlines()
    assert "warning:" in warning and "emulated and slower than fp32" in warning
    assert "runs as fp32" in warning and "GPT2JA_BF16_EMULATE=1" in warning
    # asked for: emulated, bf16's numbers, nothing said
    monkeypatch.setenv(flags.EMULATE_BF16, "1")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("今日は\n".encode())))
    assert main(base + ["--precision", "bf16"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out != fp32.out


def test_bulk_settles_the_precision_before_the_job(monkeypatch, capsys):
    from argparse import Namespace

    monkeypatch.setattr(model, "bf16_native", lambda device="/CPU:0": False)
    monkeypatch.delenv(flags.EMULATE_BF16)
    args = Namespace(precision="bf16")
    flags.settle_precision(args, "/CPU:0")
    assert args.precision == "fp32" and "runs as fp32" in capsys.readouterr().err
    monkeypatch.setattr(model, "bf16_native", lambda device="/CPU:0": True)
    args = Namespace(precision="bf16")
    flags.settle_precision(args, "/CPU:0")
    assert args.precision == "bf16" and capsys.readouterr().err == ""


def test_bf16_native_reads_the_cpu_flags(monkeypatch):
    from model import gpt2

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert gpt2.bf16_native("/GPU:0")
    cpuinfo = open("/proc/cpuinfo", encoding="utf-8").read() if sys.platform == "linux" else ""
    has = any(f in cpuinfo.split() for f in ("amx_bf16", "avx512_bf16"))
    assert gpt2.bf16_native() == has
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # Eigen's kernels: bfloat16 emulated
    assert not gpt2.bf16_native() and gpt2.bf16_native("/GPU:0")


def test_help_mentions_precision():
    for parser in (cli_transform.parser(), cli_score.parser()):
        text = parser.format_help()
        assert "--precision {fp32,bf16}" in text and "bfloat16" in text


# -- gpt2-bulk.py (the tasks it runs on each actor; the cluster itself is test_bulk.py's) -------


def test_bulk_tasks_take_precision(tiny, enc, texts, records, tmp_path):
    from tasks import bulk

    parsed = cli_bulk.parser().parse_args(["transform", "--input", "x", "--output", str(tmp_path), "--precision",
                                           "bf16"])
    task = cli_bulk._task(parsed)
    assert task.options() == {"pooling": "last", "layer": -1, "normalize": False, "precision": "bf16"}
    task.check(tiny.hparams)
    task.setup(tiny, enc)
    assert task.model.precision == "bf16" and task.vec.model is task.model
    table, _ = task.process(0, [r["context"] for r in records])
    vectors = np.asarray(table["vector"].combine_chunks().flatten()).reshape(-1, 64)
    want = Vectorizer(tiny, enc, precision="bf16").vectors_of_ids([enc.encode(r["context"]) for r in records])
    np.testing.assert_array_equal(vectors, want)

    parsed = cli_bulk.parser().parse_args(["score", "--input", "x", "--output", str(tmp_path), "--precision", "bf16"])
    task = cli_bulk._task(parsed)
    task.setup(tiny, enc)
    table, _ = task.process(0, texts)
    want = Scorer(tiny, enc, precision="bf16").score(texts)
    assert table["logprob"].to_pylist() == [s.logprob for s in want]
    # fp32 jobs are described as before --precision existed (--resume of an older job)
    assert "precision" not in bulk.TransformTask().options() and "precision" not in bulk.ScoreTask().options()
    with pytest.raises(OptionError, match="precision must be one of"):
        bulk.ScoreTask(precision="fp16").check(tiny.hparams)
