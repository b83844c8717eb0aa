"""The encoder against the original's outputs, and properties that must hold."""
import json
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import encoder
from encoder import Encoder, VocabError

from conftest import ROOT, user_env


@pytest.fixture(scope="module")
def records(golden):
    with open(golden / "encode.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -- golden -------------------------------------------------------------------


def test_vocabulary_size(enc):
    assert len(enc) == 20573
    assert enc.eos_id == 20572
    assert enc.decode([enc.eos_id]) == "<|endoftext|>"


def _mismatches(records, fn, key):
    bad = [(r["text"], fn(r), r[key]) for r in records if fn(r) != r[key]]
    return bad[:3], len(bad)


def test_byte_ids_are_the_byte_tokens(enc):
    want = {i for i, tok in enumerate(enc.tokens) if tok.startswith("<|byte") and tok.endswith("|>")}
    assert enc.byte_ids == want and len(want) > 200
    assert all(enc.decode([i]) == "" or len(enc.decode([i])) == 1 for i in want)  # one byte: no text yet, or one char


def test_golden_encode(enc, records):
    assert _mismatches(records, lambda r: enc.encode(r["text"]), "ids") == ([], 0)


def test_golden_decode(enc, records):
    assert _mismatches(records, lambda r: enc.decode(r["ids"]), "decoded") == ([], 0)


def test_golden_clean(enc, records):
    assert _mismatches(records, lambda r: enc.encode(r["text"], clean=True), "clean_ids") == ([], 0)


# -- behaviour spelled out by the original --------------------------------------


def test_whitespace_tokens(enc):
    sp, br, tab = (enc.ids[t] for t in ("<SP>", "<BR>", "<TAB>"))
    assert enc.encode(" ") == [sp]
    assert enc.encode("\u3000") == [sp]
    assert enc.encode("\r\n") == [br]
    assert enc.encode("\n") == [br]
    assert enc.encode("\r") == [br]
    assert enc.encode("\n\r") == [br, br]
    assert enc.encode("\t") == [tab]
    assert enc.decode([br], breakline="<br/>") == "<br/>"


def test_dashes_become_long_vowel_mark(enc):
    assert enc.encode("\u2014") == enc.encode("ー") == enc.encode("\u2212")


def test_overlapping_emoji_follow_table_order(enc):
    # '☠️' (U+2620 U+FE0F) lies inside the pirate flag; the original replaces
    # key by key in table order, so the result depends on that order.
    flag = "\U0001f3f4\u200d\u2620\ufe0f"
    keys = list(enc.emoji)
    assert "\u2620\ufe0f" in keys and flag in keys
    expected = flag
    for key in keys:
        if key in expected:
            expected = expected.replace(key, enc.emoji[key])
    assert expected != flag and enc.normalize(flag) == expected


def test_byte_fallback_and_decode_joins_bytes(enc):
    text = "\U000e0100"  # a variation selector outside the vocabulary
    ids = enc.encode(text)
    assert [enc.tokens[i] for i in ids] == ["<|byte%d|>" % b for b in text.encode("utf-8")]
    assert enc.decode(ids) == text
    # an invalid byte run becomes U+FFFD
    assert enc.decode([enc.ids["<|byte200|>"]]) == "\ufffd"


def test_unknown_angle_bracket_text(enc):
    ids = enc.encode("<abc>")
    assert enc.decode(ids) == "<abc>"
    assert enc.encode("<|endoftext|>") == [enc.eos_id]


def test_lone_surrogate_names_position(enc):
    with pytest.raises(ValueError, match="character 3"):
        enc.encode("abc\ud800def")


def test_encode_needs_str(enc):
    with pytest.raises(TypeError):
        enc.encode(b"bytes")


def test_decode_out_of_range(enc):
    with pytest.raises(ValueError, match="out of range"):
        enc.decode([len(enc)])
    with pytest.raises(ValueError, match="out of range"):
        enc.decode([-1])


@pytest.fixture(scope="module")
def general(enc):
    """The same vocabulary plus one entry with '<' inside ("x<y", never in the
    test texts): the encoder must then match character by character, without
    its split-at-'<' shortcut, and must still give the same ids."""
    return Encoder(enc.tokens + ["x<y"], enc.emoji, enc.emoji_inv)


def test_fast_path_equals_general_matcher(enc, general, corpus_lines):
    for line in corpus_lines:
        assert enc.encode(line) == general.encode(line), line


def test_general_matcher_with_other_vocabularies():
    # '<' inside an entry disables the split-at-'<' fast path.
    tokens = ["a", "b", "a<", "<", "<x>", "<|endoftext|>"] + ["<|byte%d|>" % i for i in range(256)]
    enc = Encoder(tokens, {}, {})
    ids = enc.encode("a<x>b")
    assert [enc.tokens[i] for i in ids] == ["a<", "<|byte120|>", "<|byte62|>", "b"]
    assert enc.decode(ids) == "a<x>b"
    assert [enc.tokens[i] for i in enc.encode("b<x>")] == ["b", "<x>"]


# -- properties -------------------------------------------------------------------

# Characters the encoder keeps losslessly: everything except what it rewrites
# on purpose (whitespace variants, dashes, emoji, which map to a
# representative) and surrogates.
_LOSSY = set(" \u3000\r\n\t\u2014\u2212")


def _lossless_alphabet(enc):
    emoji_chars = set("".join(enc.emoji))
    return st.characters(
        blacklist_categories=("Cs",),
        blacklist_characters="".join(_LOSSY | emoji_chars),
    )


@pytest.fixture(scope="module")
def alphabet(enc):
    return _lossless_alphabet(enc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_roundtrip_lossless_text(enc, alphabet, data):
    text = data.draw(st.text(alphabet=alphabet, max_size=40))
    assert enc.decode(enc.encode(text)) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_any_valid_text_encodes_in_range(enc, text):
    ids = enc.encode(text)
    assert all(0 <= i < len(enc) for i in ids)
    ids = enc.encode(text, clean=True)
    assert all(0 <= i < len(enc) for i in ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(["<SP>", "<", ">", "|", "<|byte3|>", "<|emoji1|>", "a", "日本", "語", "😀",
                                       "☠️", "🏴‍☠️", "(^^)", "1️⃣", " ", "\n", "<|endoftext|>"]), max_size=20))
def test_tricky_mixtures_match_general_algorithm(enc, general, parts):
    text = "".join(parts)
    normalized = enc.normalize(text)
    assert enc.encode(text) == general.encode(text)
    # the emoji shortcut equals replacing every key in table order
    slow = text
    for a, b in (("\r\n", "<BR>"), (" ", "<SP>"), ("\n", "<BR>")):
        slow = slow.replace(a, b)
    for key, token in enc.emoji.items():
        if key in slow:
            slow = slow.replace(key, token)
    assert normalized == slow


# -- loading -----------------------------------------------------------------------


def test_load_from_environment(vocab_dir, monkeypatch):
    monkeypatch.setenv("GPT2JA_VOCAB", str(vocab_dir))
    assert len(encoder.load()) == 20573


def test_the_vocabulary_ships_with_the_package(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2JA_VOCAB", raising=False)
    assert encoder.find_vocab() == ROOT / "encoder"
    assert len(encoder.load()) == 20573
    # a $GPT2JA_VOCAB without the files falls back to the package's copy
    monkeypatch.setenv("GPT2JA_VOCAB", str(tmp_path / "nowhere"))
    assert encoder.find_vocab() == ROOT / "encoder"


def test_missing_vocabulary_names_the_place(tmp_path):
    with pytest.raises(VocabError) as e:
        encoder.load(tmp_path / "nowhere")
    msg = str(e.value)
    assert "ja-bpe.txt" in msg and str(tmp_path / "nowhere") in msg and "Japanese-BPEEncoder" in msg


def test_missing_emoji_file(tmp_path, vocab_dir):
    shutil.copy(vocab_dir / "ja-bpe.txt", tmp_path)
    with pytest.raises(VocabError, match="emoji.json"):
        encoder.load(tmp_path)


def test_malformed_emoji_file(tmp_path, vocab_dir):
    shutil.copy(vocab_dir / "ja-bpe.txt", tmp_path)
    (tmp_path / "emoji.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(VocabError, match="emoji.json.*not valid JSON"):
        encoder.load(tmp_path)
    (tmp_path / "emoji.json").write_text('{"emoji": []}', encoding="utf-8")
    with pytest.raises(VocabError, match="malformed"):
        encoder.load(tmp_path)


def test_malformed_vocabulary_file(tmp_path, vocab_dir):
    shutil.copy(vocab_dir / "emoji.json", tmp_path)
    (tmp_path / "ja-bpe.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(VocabError, match="ja-bpe.txt.*does not look like"):
        encoder.load(tmp_path)
    (tmp_path / "ja-bpe.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(VocabError, match="not UTF-8"):
        encoder.load(tmp_path)


def test_trailing_newline_in_vocabulary(tmp_path, vocab_dir):
    shutil.copy(vocab_dir / "emoji.json", tmp_path)
    data = (vocab_dir / "ja-bpe.txt").read_bytes()
    (tmp_path / "ja-bpe.txt").write_bytes(data + b"\n")
    assert len(encoder.load(tmp_path)) == 20573


# -- the command ---------------------------------------------------------------------


def _cli(args, stdin: bytes, vocab_dir):
    return subprocess.run(
        [sys.executable, "-m", "encoder", *args, "--vocab", str(vocab_dir)],
        input=stdin, capture_output=True, cwd=ROOT, timeout=120,
    )


def test_cli_encode_decode_roundtrip(enc, vocab_dir):
    text = "今日は良い天気です。\nEnglish words and 1️⃣ emoji 😀\n\n最後の行"
    r = _cli(["encode"], text.encode("utf-8"), vocab_dir)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.decode("utf-8").splitlines()]
    assert rows == [enc.encode(line) for line in text.split("\n")]
    r2 = _cli(["decode"], r.stdout, vocab_dir)
    assert r2.returncode == 0, r2.stderr
    expected = [enc.decode(ids) for ids in rows]
    assert r2.stdout.decode("utf-8").split("\n")[:-1] == expected


def test_cli_encode_clean_and_crlf(enc, vocab_dir):
    r = _cli(["encode", "--clean"], "電話は03-1234-5678です\r\n".encode("utf-8"), vocab_dir)
    assert r.returncode == 0
    assert json.loads(r.stdout) == enc.encode("電話は03-1234-5678です", clean=True)


def test_cli_decode_line_breaks_and_json(enc, vocab_dir):
    ids = enc.encode("一行目\n二行目")
    r = _cli(["decode"], (json.dumps(ids) + "\n").encode(), vocab_dir)
    assert r.stdout.decode("utf-8") == "一行目\\n二行目\n"
    r = _cli(["decode", "--json"], (json.dumps(ids) + "\n").encode(), vocab_dir)
    assert json.loads(r.stdout) == "一行目\n二行目"


@pytest.mark.parametrize(
    "command,stdin,message",
    [
        ("encode", b"ok\n\xff\xfe broken\n", "line 2: invalid UTF-8"),
        ("encode", "ok\n\\ud800\n".encode().replace(b"\\ud800", b"\xed\xa0\x80"), "line 2: invalid UTF-8"),
        ("decode", b"[1,2]\n[1,\n", "line 2: not a JSON array"),
        ("decode", b"[1,2]\n{\"a\": 1}\n", "line 2: not a JSON array"),
        ("decode", b"[1,2]\n[1.5]\n", "line 2: not a JSON array"),
        ("decode", b"[1,2]\n[3]\n[99999]\n", "line 3: token id 99999 is out of range"),
    ],
)
def test_cli_errors_keep_earlier_lines(command, stdin, message, vocab_dir):
    r = _cli([command], stdin, vocab_dir)
    assert r.returncode == 2
    err = r.stderr.decode("utf-8")
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert len(r.stdout.decode("utf-8").splitlines()) >= 1  # earlier lines were written


def test_cli_finds_the_vocabulary_as_encoder_load_does(enc, tmp_path):
    env = {k: v for k, v in user_env().items() if k != "GPT2JA_VOCAB"}
    env["GPT2JA_HOME"] = str(tmp_path)  # nothing cached there, nothing downloaded
    r = subprocess.run([sys.executable, "-m", "encoder", "encode"], input="吾輩は猫である。\n".encode(),
                       capture_output=True, cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == enc.encode("吾輩は猫である。")
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_vocabulary(tmp_path):
    r = subprocess.run([sys.executable, "-m", "encoder", "encode", "--vocab", str(tmp_path)],
                       input=b"x\n", capture_output=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "ja-bpe.txt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bad_usage():
    r = subprocess.run([sys.executable, "-m", "encoder", "frobnicate"], capture_output=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and b"Traceback" not in r.stderr
