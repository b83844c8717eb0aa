"""gpt2-score.py and tasks.score: goldens, batching, sliding window, formats, pipelines, errors."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import model
from cli import score as cli_score
from cli.errors import UsageError
from tasks.score import Scorer, score_ids, score_sequences, windows

from conftest import ROOT

SCRIPT = str(ROOT / "gpt2-score.py")
FLAG_SETS = ("", "--exclude-end", "--tokens", "--tokens --exclude-end")


@pytest.fixture(scope="module")
def goldens(golden):
    with open(golden / "tiny" / "score.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def contexts(golden):
    return (golden / "contexts.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def small_ctx():
    """A random model with a 16-token context, to exercise the sliding window."""
    hp = model.HParams(n_vocab=20573, n_ctx=16, n_embd=32, n_head=2, n_layer=2)
    return model.Model.from_weights(model.random_weights(hp, seed=3), hparams=hp)


def _base(model_dir):
    return ["--model", str(model_dir), "--gpu", "-1"]


def _main(argv, capsys, stdin_text=None, monkeypatch=None):
    if stdin_text is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin_text.encode("utf-8")), encoding="utf-8"))
    assert cli_score.main(argv) == 0
    return capsys.readouterr()


def _cli(args, env, stdin=None, timeout=180):
    return subprocess.run([sys.executable, SCRIPT, *args], input=stdin, capture_output=True, env=env,
                          cwd=ROOT, timeout=timeout)


def _reference_logprob(m, ids, i, start=0):
    """log p(ids[i] | ids[start:i]) from the model's full logits, in float64."""
    logits = m.logits([ids[start:i]])[0, -1].astype(np.float64)
    top = logits.max()
    return logits[ids[i]] - top - math.log(np.exp(logits - top).sum())


# -- comparing printed numbers with the golden -------------------------------------------


def _same_number(got: str, want: str) -> bool:
    """Equal as printed, or (the issue's tolerance) different only in the last of the five
    significant digits, by one unit, where the golden value is within 1e-4 relative of the
    rounding boundary between the two."""
    if got == want:
        return True
    g, w = float(got), float(want)
    if w == 0:
        return False
    unit = 10.0 ** (math.floor(math.log10(abs(w))) - 4)
    if abs(abs(g - w) - unit) > unit * 1e-6:
        return False
    boundary = (g + w) / 2
    return abs(w - boundary) <= 1e-4 * abs(w)


def _assert_matches_golden(out: str, want: str):
    got_lines, want_lines = out.split("\n"), want.split("\n")
    assert len(got_lines) == len(want_lines)
    for got, exp in zip(got_lines, want_lines):
        if "\t" not in exp:
            assert got == exp
            continue
        g_text, g_num = got.rsplit("\t", 1)
        w_text, w_num = exp.rsplit("\t", 1)
        assert g_text == w_text
        assert _same_number(g_num, w_num), (got, exp)


def test_number_tolerance_helper():
    assert _same_number("-464.77", "-464.77")
    assert _same_number("-464.78", "-464.77")
    assert not _same_number("-464.79", "-464.77")
    assert not _same_number("-46.477", "-464.77")
    assert _same_number("-9.2076", "-9.2075")
    assert _same_number("-12.47", "-12.471")  # %g drops the trailing zero of -12.470


# -- goldens -------------------------------------------------------------------------------


def test_golden_every_flag_set(goldens, contexts, tiny_model_dir, env, capsys, monkeypatch):
    assert sorted(goldens) == sorted(FLAG_SETS)
    for flags, want in goldens.items():
        out = _main(_base(tiny_model_dir) + flags.split() + ["-"], capsys, contexts, monkeypatch).out
        _assert_matches_golden(out, want)


def test_golden_through_the_script(goldens, contexts, tiny_model_dir, env):
    p = _cli(_base(tiny_model_dir) + ["--tokens", "-"], env, stdin=contexts.encode("utf-8"))
    assert p.returncode == 0, p.stderr
    assert p.stderr == b""  # no TensorFlow chatter, no progress bar off a terminal
    _assert_matches_golden(p.stdout.decode("utf-8"), goldens["--tokens"])


def test_golden_from_a_file_with_batching(goldens, contexts, tiny_model_dir, tmp_path, env, capsys):
    path = tmp_path / "contexts.txt"
    path.write_text(contexts, encoding="utf-8")
    for batch in ("1", "64", "100000"):
        out = _main(_base(tiny_model_dir) + ["--exclude-end", "--batch_tokens", batch, str(path)], capsys).out
        _assert_matches_golden(out, goldens["--exclude-end"])


# -- the library -----------------------------------------------------------------------------


def test_score_ids_is_the_log_softmax_of_the_logits(tiny, enc):
    ids = [enc.eos_id] + enc.encode("俺の名前は坂本俊之。何処にでもいるサラリーマンだ。")
    got = score_ids(tiny, [ids])
    assert got.shape == (1, len(ids) - 1) and got.dtype == np.float32
    want = [_reference_logprob(tiny, ids, i) for i in range(1, len(ids))]
    np.testing.assert_allclose(got[0], want, atol=1e-4)


def test_score_ids_padding_and_first(tiny, enc):
    a = [enc.eos_id] + enc.encode("明日も晴れるかな")
    b = [enc.eos_id] + enc.encode("江戸時代のインターネット回線です。")
    both = score_ids(tiny, [a, b], first=[1, 3])
    alone_a, alone_b = score_ids(tiny, [a])[0], score_ids(tiny, [b])[0]
    np.testing.assert_allclose(both[0, :len(a) - 1], alone_a, atol=1e-5)
    assert (both[0, len(a) - 1:] == 0).all()  # padding
    assert (both[1, :2] == 0).all()  # before first
    np.testing.assert_allclose(both[1, 2:], alone_b[2:], atol=1e-5)


def test_score_ids_errors(tiny, small_ctx):
    with pytest.raises(model.ModelError, match="longer than the model's context of 16"):
        score_ids(small_ctx, [list(range(17))])
    with pytest.raises(model.ModelError, match="outside the vocabulary"):
        score_ids(tiny, [[1, 20573]])
    with pytest.raises(model.ModelError, match="empty batch"):
        score_ids(tiny, [])
    assert score_ids(tiny, [[5]]).shape == (1, 0)


def test_batched_equals_one_by_one(tiny, enc, corpus_lines):
    texts = corpus_lines[:40] + ["あ", "今日は良い天気😀です。"]
    one_by_one = [s.logprobs for s in Scorer(tiny, enc, max_tokens=1, max_batch=1).score(texts)]
    for max_tokens in (64, 4096):
        batched = list(Scorer(tiny, enc, max_tokens=max_tokens).score(texts))
        assert [s.text for s in batched] == texts
        for a, b in zip(batched, one_by_one):
            np.testing.assert_allclose(a.logprobs, b, atol=1e-4, rtol=1e-4)
            assert abs(a.logprob - float(np.sum(b, dtype=np.float64))) <= 1e-4 * abs(a.logprob)


def test_score_gives_a_list_and_scores_a_stream(tiny, enc):
    """README's promise: Scorer(m, enc).score(texts) is a list of TextScore; scores() streams."""
    import types

    scorer = Scorer(tiny, enc)
    listed = scorer.score(["今日は", "明日は"])
    assert isinstance(listed, list) and listed[1].text == "明日は" and listed[0].perplexity > 0
    streamed = scorer.scores(["今日は", "明日は"])
    assert isinstance(streamed, types.GeneratorType)
    assert [s.logprob for s in streamed] == [s.logprob for s in listed]


def test_results_stream_in_input_order(tiny, enc, monkeypatch):
    import tasks.score as score_module

    calls = []
    real = score_module.score_ids
    monkeypatch.setattr(score_module, "score_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    # the first sequence is the shortest: it is done after the first batch
    seqs = [[enc.eos_id, 5]] + [[enc.eos_id] + [7] * n for n in range(30, 0, -1)]
    it = score_sequences(tiny, seqs, max_tokens=40)
    index, first = next(it)
    assert index == 0 and len(first) == 1 and len(calls) == 1
    rest = list(it)
    assert [i for i, _ in rest] == list(range(1, len(seqs)))
    assert len(calls) > 1
    assert [len(lp) for _, lp in rest] == [len(s) - 1 for s in seqs[1:]]


def test_plan_respects_the_budget_and_covers_every_row():
    from tasks.score import _plan

    rng = np.random.default_rng(3)
    widths = [int(w) for w in rng.integers(1, 70, 300)] + [1024, 1024, 900]
    for max_tokens, max_batch in ((2048, 128), (64, 4), (1, 1)):
        batches = _plan(widths, max_tokens, max_batch)
        assert sorted(i for b in batches for i in b) == list(range(len(widths)))
        for b in batches:
            assert len(b) <= max_batch
            assert len(b) == 1 or len(b) * max(widths[i] for i in b) <= max_tokens
    # sorted by width, so little padding: under 10% here
    batches = _plan(widths[:300], 2048, 128)
    padded = sum(len(b) * max(widths[i] for i in b) for b in batches)
    assert sum(widths[:300]) / padded > 0.9
    assert _plan([], 2048, 128) == []


def test_windows_cover_every_token_once():
    for n_ctx, stride in ((16, 8), (16, 1), (16, 15), (1024, 512), (5, 3)):
        for length in (0, 1, 2, n_ctx - 1, n_ctx, n_ctx + 1, 3 * n_ctx + 7):
            ws = windows(length, n_ctx, stride)
            covered = []
            for start, end, first in ws:
                assert 0 <= start < first <= end <= length and end - start <= n_ctx
                covered += list(range(first, end))
                # every scored token sees at least n_ctx - stride tokens before it (or all of them)
                assert first - start >= min(first, n_ctx - stride)
            assert covered == list(range(1, length))
            if length > n_ctx:
                assert [w[0] for w in ws] == [k * stride for k in range(len(ws))]
    assert windows(20, 16) == [(0, 16, 1), (8, 20, 16)]  # default stride n_ctx / 2
    for bad in (0, 16, -1):
        with pytest.raises(model.ModelError, match="stride must be between 1 and n_ctx - 1 = 15"):
            windows(40, 16, bad)


@pytest.mark.parametrize("stride", [None, 5, 15])
def test_sliding_window_equals_explicit_windows(small_ctx, stride):
    n_ctx = small_ctx.hparams.n_ctx
    s = n_ctx // 2 if stride is None else stride
    rng = np.random.default_rng(7)
    seq = [int(t) for t in rng.integers(0, 20573, 53)]
    (_, got), = list(score_sequences(small_ctx, [seq], stride=stride))
    assert got.shape == (52,)
    for i in range(1, len(seq)):
        # the window that scores token i: the first one (starting at k * stride) that reaches past it
        k = max(0, -(-(i - n_ctx + 1) // s))
        start = k * s
        assert min(i, n_ctx - s) <= i - start <= n_ctx - 1
        assert abs(got[i - 1] - _reference_logprob(small_ctx, seq, i, start)) < 1e-4, i
    # tokens within the first window see everything before them: as without a window
    np.testing.assert_allclose(got[:n_ctx - 1], score_ids(small_ctx, [seq[:n_ctx]])[0], atol=1e-5)


def test_sliding_window_batched_equals_one_by_one(small_ctx):
    rng = np.random.default_rng(8)
    seqs = [[int(t) for t in rng.integers(0, 20573, n)] for n in (3, 40, 16, 17, 1, 90, 2)]
    alone = [lp for s in seqs for _, lp in score_sequences(small_ctx, [s], max_tokens=1)]
    together = [lp for _, lp in score_sequences(small_ctx, seqs, max_tokens=64)]
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_long_line_through_the_cli(small_ctx, vocab_dir, tmp_path, enc, env, capsys, monkeypatch):
    model.save(small_ctx, tmp_path / "m", step=1)
    text = "江戸時代のインターネット回線は遅かったが、皆が楽しく使っていた。" * 3
    ids = enc.encode(text) + [enc.eos_id]
    assert len(ids) > 3 * 16
    out = _main(_base(tmp_path / "m") + ["--stride", "4", "--format", "jsonl", "-"], capsys, text + "\n",
                monkeypatch).out
    record = json.loads(out)
    (_, want), = list(score_sequences(small_ctx, [[enc.eos_id] + ids], stride=4))
    assert record["tokens"] == len(ids)
    assert abs(record["logprob"] - float(np.sum(want, dtype=np.float64))) < 1e-4 * abs(record["logprob"])
    from tasks.errors import OptionError

    with pytest.raises(OptionError, match="stride must be below the model's context of 16 tokens"):
        cli_score.main(_base(tmp_path / "m") + ["--stride", "16", "-"])


# -- formats and input ---------------------------------------------------------------------


def test_jsonl(contexts, goldens, tiny_model_dir, env, capsys, monkeypatch):
    out = _main(_base(tiny_model_dir) + ["--format", "jsonl", "-"], capsys, contexts, monkeypatch).out
    records = [json.loads(line) for line in out.splitlines()]
    golden_lines = goldens[""].splitlines()
    assert len(records) == len(golden_lines) == 14
    for r, line in zip(records, golden_lines):
        assert set(r) == {"text", "logprob", "tokens", "perplexity"}
        text, number = line.rsplit("\t", 1)
        assert r["text"] == text
        assert _same_number("%.5g" % r["logprob"], number)
        assert r["perplexity"] == pytest.approx(math.exp(-r["logprob"] / r["tokens"]), rel=1e-12)

    out = _main(_base(tiny_model_dir) + ["--format", "jsonl", "--tokens", "--exclude-end", "-"], capsys,
                contexts, monkeypatch).out
    records = [json.loads(line) for line in out.splitlines()]
    blocks = goldens["--tokens --exclude-end"].split("\n\n")[:-1]
    assert len(records) == len(blocks)
    for r, block in zip(records, blocks):
        lines = block.split("\n")
        assert r["tokens"] == len(r["token_logprobs"]) == len(lines) - 1
        assert sum(t["logprob"] for t in r["token_logprobs"]) == pytest.approx(r["logprob"], rel=1e-6)
        for t, line in zip(r["token_logprobs"], lines[1:]):
            token, number = line.rsplit("\t", 1)
            assert set(t) == {"id", "token", "logprob"}
            assert t["token"] == token
            assert _same_number("%.5g" % t["logprob"], number)


def test_lines_are_stripped_and_empty_lines_skipped(tiny_model_dir, env, capsys, monkeypatch):
    out = _main(_base(tiny_model_dir) + ["-"], capsys, "  明日も晴れるかな \n\n\u3000\n\t江戸時代\r\nあ\rい\n",
                monkeypatch).out
    # Python's universal newlines (the original read text mode): a lone \r ends a line too
    assert [line.split("\t")[0] for line in out.splitlines()] == ["明日も晴れるかな", "江戸時代", "あ", "い"]
    want = _main(_base(tiny_model_dir) + ["-"], capsys, "明日も晴れるかな\n", monkeypatch).out
    assert out.splitlines()[0] == want.strip()


def test_output_file_is_atomic(contexts, goldens, tiny_model_dir, tmp_path, env, capsys):
    src = tmp_path / "in.txt"
    src.write_text(contexts, encoding="utf-8")
    target = tmp_path / "out.txt"
    assert _main(_base(tiny_model_dir) + ["--output_file", str(target), str(src)], capsys).out == ""
    assert target.read_text(encoding="utf-8") == goldens[""]
    bad = tmp_path / "bad.txt"
    bad.write_bytes("今日は\n".encode() + b"\xff\n")
    with pytest.raises(UsageError, match="line 2: invalid UTF-8"):
        cli_score.main(_base(tiny_model_dir) + ["--output_file", str(target), str(bad)])
    assert target.read_text(encoding="utf-8") == goldens[""]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "in.txt", "out.txt"]


# -- pipelines and errors ---------------------------------------------------------------------


def test_error_after_some_lines_keeps_them(contexts, goldens, tiny_model_dir, env):
    data = "\n".join(contexts.splitlines()[:3]).encode("utf-8") + b"\n\xfe\xff\n" + "明日\n".encode()
    p = _cli(_base(tiny_model_dir) + ["-"], env, stdin=data)
    assert p.returncode == 2
    assert p.stdout.decode("utf-8") == "".join(goldens[""].splitlines(True)[:3])
    err = p.stderr.decode("utf-8")
    assert err.count("\n") == 1 and err.startswith("gpt2-score.py: error: standard input, line 4: invalid UTF-8")
