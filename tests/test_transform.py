"""gpt2-transform.py and tasks.vectors: goldens, batching, formats, options, errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from cli import transform as cli_transform
from cli.errors import UsageError
from tasks.vectors import Vectorizer

from conftest import ROOT

SCRIPT = str(ROOT / "gpt2-transform.py")


@pytest.fixture(scope="module")
def records(golden):
    with open(golden / "tiny" / "transform.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _main(argv, capsys):
    assert cli_transform.main(argv) == 0
    return capsys.readouterr()


def _base(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--gpu", "-1"]


def test_golden_vectors(records, tiny_model_dir, env, capsys):
    assert len(records) == 14
    for r in records:
        out = _main(_base(tiny_model_dir) + ["--context", r["context"]], capsys).out
        vector = json.loads(out)
        assert len(vector) == 64
        np.testing.assert_allclose(vector, r["vector"], atol=1e-4)


def test_output_format_is_the_originals(records, tiny_model_dir, env, capsys):
    out = _main(_base(tiny_model_dir) + ["--context", records[0]["context"]], capsys).out
    values = json.loads(out)
    # Python's repr of float32 values widened to float
    assert out == "[" + ", ".join(repr(float(np.float32(v))) for v in values) + "]\n"


def test_golden_through_the_script(records, tiny_model_dir, env):
    p = subprocess.run([sys.executable, SCRIPT, *_base(tiny_model_dir), "--context", records[3]["context"]],
                       capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and p.stderr == b""
    np.testing.assert_allclose(json.loads(p.stdout), records[3]["vector"], atol=1e-4)


def test_batched_equals_one_by_one(records, tiny, enc):
    vec = Vectorizer(tiny, enc, max_tokens=256)
    texts = [r["context"] for r in records]
    batched = vec.vectors_of_ids([vec.ids(t)[0] for t in texts])
    for text, row in zip(texts, batched):
        single = vec.batch_vectors([vec.ids(text)[0]])[0]
        np.testing.assert_allclose(row, single, atol=1e-5)


def test_input_file_every_format(records, tiny_model_dir, tmp_path, env, capsys):
    texts = [r["context"] for r in records[:5]]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    base = _base(tiny_model_dir) + ["--input", str(src)]
    as_json = [json.loads(line) for line in _main(base, capsys).out.splitlines()]
    as_jsonl = [json.loads(line) for line in _main(base + ["--format", "jsonl"], capsys).out.splitlines()]
    as_tsv = [[float(x) for x in line.split("\t")] for line in _main(base + ["--format", "tsv"], capsys).out.splitlines()]
    npy = tmp_path / "v.npy"
    assert _main(base + ["--format", "npy", "--output_file", str(npy)], capsys).out == ""
    arr = np.load(npy)
    assert arr.dtype == np.float32 and arr.shape == (5, 64)
    assert [r["text"] for r in as_jsonl] == texts
    for i, r in enumerate(records[:5]):
        np.testing.assert_allclose(as_json[i], r["vector"], atol=1e-4)
        assert as_jsonl[i]["vector"] == as_json[i] == as_tsv[i]
        np.testing.assert_array_equal(arr[i], np.array(as_json[i], np.float32))


def test_pooling_layer_normalize_match_model_hidden(records, tiny, enc, tiny_model_dir, env, capsys):
    text = records[2]["context"]
    ids = enc.encode(text)
    base = _base(tiny_model_dir) + ["--context", text]
    mean = json.loads(_main(base + ["--pooling", "mean"], capsys).out)
    np.testing.assert_allclose(mean, tiny.hidden([ids])[0].mean(axis=0), atol=1e-5)
    layer0 = json.loads(_main(base + ["--layer", "0"], capsys).out)
    np.testing.assert_allclose(layer0, tiny.hidden([ids], layer=0)[0, -1], atol=1e-5)
    unit = np.array(json.loads(_main(base + ["--normalize"], capsys).out))
    assert abs(np.linalg.norm(unit) - 1.0) < 1e-6
    np.testing.assert_allclose(unit, np.array(records[2]["vector"]) / np.linalg.norm(records[2]["vector"]), atol=1e-4)


def test_empty_and_long_lines(tiny_model_dir, tmp_path, env, capsys, tiny, enc):
    long = "あいうえお、" * 400  # more than 1,024 tokens
    src = tmp_path / "in.txt"
    src.write_text("今日は\n\n" + long + "\n", encoding="utf-8")
    out = _main(_base(tiny_model_dir) + ["--input", str(src), "--format", "jsonl"], capsys)
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert len(rows) == 3  # one row per input line, always
    np.testing.assert_allclose(rows[1]["vector"], tiny.hidden([[enc.eos_id]])[0, -1], atol=1e-5)
    ids = enc.encode(long)
    assert len(ids) > 1024
    np.testing.assert_allclose(rows[2]["vector"], tiny.hidden([ids[-1024:]])[0, -1], atol=1e-4)
    warnings = out.err.strip().splitlines()
    assert any("line 2" in w and "empty" in w for w in warnings)
    assert any("line 3" in w and "1024" in w for w in warnings)
    assert len(warnings) == 2


def test_context_from_stdin(records, tiny_model_dir, env):
    p = subprocess.run([sys.executable, SCRIPT, *_base(tiny_model_dir), "--context", "-"],
                       input=(records[1]["context"] + "\n").encode(), capture_output=True, env=env, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    np.testing.assert_allclose(json.loads(p.stdout), records[1]["vector"], atol=1e-4)


def test_error_after_some_lines_keeps_them(tiny_model_dir, env):
    stdin = "今日は\n明日も\n".encode() + b"\xff\n"
    p = subprocess.run([sys.executable, SCRIPT, *_base(tiny_model_dir), "--input", "-", "--format", "jsonl"],
                       input=stdin, capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 2
    assert len(p.stdout.decode().splitlines()) == 2
    err = p.stderr.decode()
    assert "line 3: invalid UTF-8" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    ([], "give the text with --context"),
    (["--context", "x", "--format", "npy"], "--output_file"),
])
def test_usage_errors(args, message, tiny_model_dir):
    with pytest.raises(UsageError, match=message):
        cli_transform.main(["--model", str(tiny_model_dir), *args])


def test_npy_not_written_on_error(tiny_model_dir, tmp_path, env):
    target = tmp_path / "v.npy"
    p = subprocess.run([sys.executable, SCRIPT, *_base(tiny_model_dir), "--input", "-", "--format", "npy",
                        "--output_file", str(target)], input="今日は\n".encode() + b"\xff\n",
                       capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 2
    assert list(tmp_path.iterdir()) == []
