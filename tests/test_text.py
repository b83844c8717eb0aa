"""tasks/text.py: the context cut, stop strings followed in linear time, text assembly."""
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.text import StopMatcher, TextAssembler, context_ids, cut_at_stop, held_back


def _naive_held(text, stop):
    """The longest suffix of text that is a proper prefix of a stop string (the definition)."""
    best = 0
    for s in stop:
        for k in range(1, len(s)):
            if k <= len(text) and text.endswith(s[:k]):
                best = max(best, k)
    return best


ALPHABET = st.sampled_from("abあい。")


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.text(ALPHABET, max_size=5), max_size=12),
       stop=st.lists(st.text(ALPHABET, min_size=1, max_size=6), min_size=1, max_size=4))
def test_the_matcher_agrees_with_the_definitions_after_every_piece(pieces, stop):
    matcher = StopMatcher(stop)
    text = ""
    for piece in pieces:
        matcher.feed(piece)
        text += piece
        assert matcher.found == cut_at_stop(text, stop)[1]
        if not matcher.found:
            assert matcher.held == _naive_held(text, stop) == held_back(text, stop)


def test_overlapping_and_repeated_stop_strings():
    m = StopMatcher(["aab"])
    m.feed("aa")
    assert (m.found, m.held) == (False, 2)
    m.feed("a")  # "aaa": the last two may still start "aab"
    assert (m.found, m.held) == (False, 2)
    m.feed("b")
    assert m.found
    m = StopMatcher(["。", "ます"])
    m.feed("そうでしま")
    assert (m.found, m.held) == (False, 1)
    m.feed("す")
    assert m.found
    assert cut_at_stop("そうでします。", ["。", "ます"]) == ("そうでし", True)


def test_a_long_stop_string_is_followed_piece_by_piece():
    stop = "あ" * 5000 + "い"
    m = StopMatcher([stop])
    for _ in range(10):
        m.feed("あ" * 1000)
    assert not m.found and m.held == 5000  # the text's last 5,000 characters may start it
    m.feed("い")
    assert m.found


def test_the_context_cut(enc):
    ids = enc.encode("今日は良い天気です。" * 200)
    assert context_ids(enc, "今日は良い天気です。" * 200, 1024) == ids[-512:]
    assert context_ids(enc, "", 1024) == [enc.eos_id]
    assert context_ids(enc, "今日は", 16) == enc.encode("今日は")[-8:]


def test_assembled_pieces_concatenate_to_the_decoded_text(enc):
    ids = enc.encode("今日は🙂良い天気\nです。<|endoftext|>")
    ids = ids[:-1] + [t for t in sorted(enc.byte_ids)[:3]] + ids[:2]  # byte tokens held back
    asm = TextAssembler(enc)
    pieces = [asm.push(t) for t in ids] + [asm.finish()]
    assert "".join(pieces) == asm.text == enc.decode(ids)
