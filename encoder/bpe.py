"""The Japanese BPE encoder of the released gpt2ja models.

Token-for-token compatible with the encoder that shipped with the original
gpt2-japanese tools (vocabulary ``ja-bpe.txt`` and emoji table ``emoji.json``
from the Japanese-BPEEncoder project), but several times faster: the original
tests every one of the 4,314 emoji keys against every text, this one only
looks at the keys whose first character occurs in the text.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

VOCAB_FILE = "ja-bpe.txt"
EMOJI_FILE = "emoji.json"
VOCAB_SOURCE = (
    "the official files come from the Japanese-BPEEncoder project "
    "(https://github.com/tanreinama/Japanese-BPEEncoder: ja-bpe.txt and emoji.json)"
)
EOS_TOKEN = "<|endoftext|>"

# Characters the original rewrites before tokenizing, in the original's order.
_PRE_REPLACE = (
    (" ", "<SP>"),
    ("\u3000", "<SP>"),
    ("\r\n", "<BR>"),
    ("\n", "<BR>"),
    ("\r", "<BR>"),
    ("\t", "<TAB>"),
    ("\u2014", "\u30fc"),  # EM DASH -> KATAKANA-HIRAGANA PROLONGED SOUND MARK
    ("\u2212", "\u30fc"),  # MINUS SIGN -> the same
)

_SURROGATE = re.compile("[\ud800-\udfff]")

# Substitutions of encode(..., clean=True), applied in this order.
_CLEAN_PATTERNS = (
    (re.compile(r"(https?|ftp)(:\/\/[-_\.!~*\'()a-zA-Z0-9;\/?:\@&=\+$,%#]+)"), "<URL>"),
    (re.compile(r"[A-Za-z0-9\._+]*@[\-_0-9A-Za-z]+(\.[A-Za-z]+)*"), "<EMAIL>"),
    (re.compile(r"[\(]{0,1}[0-9]{2,4}[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}"), "<TEL>"),
    (
        re.compile(
            r"([12]\d{3}[/\-年])*(0?[1-9]|1[0-2])[/\-月]((0?[1-9]|[12][0-9]|3[01])日?)*"
            r"(\d{1,2}|:|\d{1,2}時|\d{1,2}分|\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\))*"
        ),
        "<DATE>",
    ),
    (
        re.compile(
            r"(明治|大正|昭和|平成|令和|㍾|㍽|㍼|㍻|\u32ff)\d{1,2}年(0?[1-9]|1[0-2])月"
            r"(0?[1-9]|[12][0-9]|3[01])日"
            r"(\d{1,2}|:|\d{1,2}時|\d{1,2}分|\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\))*"
        ),
        "<DATE>",
    ),
    (
        re.compile(
            r"((0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*億)*((0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*万)*"
            r"((0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*千)*(0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*"
            r"(千円|万円|千万円|円|千ドル|万ドル|千万ドル|ドル|千ユーロ|万ユーロ|千万ユーロ|ユーロ)+"
            r"(\(税込\)|\(税抜\)|\+tax)*"
        ),
        "<PRICE>",
    ),
)


def _emoji_gates(emoji: dict) -> list:
    """Fast searches that find something in every text containing an emoji
    key (and in few others), so that most texts skip the exact replacement.

    Keys that start with a non-ASCII character are found by one character
    class (any astral character, or the BMP first characters); keys that
    start with an ASCII character ('(' of emoticons, digits of keycaps) by
    their first two characters.
    """
    bmp_first = set()
    ascii_pairs: dict[str, set] = {}
    ascii_single = set()
    for key in emoji:
        if not key:
            continue
        c = key[0]
        if not c.isascii():
            if ord(c) < 0x10000:
                bmp_first.add(c)
        elif len(key) == 1:
            ascii_single.add(c)
        else:
            ascii_pairs.setdefault(c, set()).add(key[1])
    gates = []
    cls = "".join(re.escape(c) for c in sorted(bmp_first))
    gates.append(re.compile("[" + cls + "\U00010000-\U0010ffff]").search)
    branches = [re.escape(c) for c in sorted(ascii_single)]
    for c, seconds in sorted(ascii_pairs.items()):
        if c not in ascii_single:
            branches.append(re.escape(c) + "[" + "".join(re.escape(x) for x in sorted(seconds)) + "]")
    if branches:
        gates.append(re.compile("|".join(branches)).search)
    return gates


class VocabError(Exception):
    """The vocabulary files are missing or malformed."""


class EncodeError(ValueError):
    """A text that cannot be encoded (a lone surrogate) or ids that cannot be decoded."""


def clean_text(text: str) -> str:
    """The original's ``clean_text``: zenkaku ASCII and digits to hankaku,
    then URL, e-mail, telephone, date and price spans to placeholder tokens."""
    import jaconv  # only needed for clean=True; keeps plain encoding import-light

    text = jaconv.z2h(text, kana=False, digit=True, ascii=True)
    for pattern, token in _CLEAN_PATTERNS:
        text = pattern.sub(token, text)
    return text


class Encoder:
    """Greedy longest-match BPE over the ja-bpe vocabulary.

    ``tokens`` is the vocabulary (id -> string); ``emoji`` maps emoji strings
    to ``<|emojiN|>`` tokens in the order of emoji.json; ``emoji_inv`` maps
    those tokens back to one representative emoji.
    """

    def __init__(self, tokens: Sequence[str], emoji: dict, emoji_inv: dict):
        self.tokens = list(tokens)
        self.ids = {tok: i for i, tok in enumerate(self.tokens)}  # last wins, as the original
        self.emoji = dict(emoji)
        self.emoji_inv = dict(emoji_inv)
        try:
            self.eos_id = self.ids[EOS_TOKEN]
        except KeyError:
            raise VocabError(f"{VOCAB_FILE} has no {EOS_TOKEN} entry") from None
        self._byte_ids = [self.ids.get("<|byte%d|>" % b) for b in range(256)]
        # Vocabulary entries starting with '<' are matched at '<' up to the
        # longest entry; elsewhere at most two characters are considered.
        angle = [t for t in self.tokens if t.startswith("<")]
        self._angle_lengths = sorted({len(t) for t in angle}, reverse=True)
        self._angle_max = self._angle_lengths[0] if angle else 1
        self._lt_id = self.ids.get("<")
        self._angle_split = all(
            "<" not in t[1:] and len(t) <= 2 for t in self.tokens if not t.startswith("<")
        ) and all(t == "<" or (t.endswith(">") and "<" not in t[1:]) for t in angle)
        # Emoji keys indexed by first character, with their position in the
        # table, so that only keys that can occur are tried (in table order).
        self._emoji_keys = list(self.emoji.items())
        by_first: dict[str, list[int]] = {}
        for index, (key, _) in enumerate(self._emoji_keys):
            if key:
                by_first.setdefault(key[0], []).append(index)
        self._emoji_by_first = by_first
        self._emoji_first = frozenset(by_first)
        self._emoji_gates = _emoji_gates(self.emoji)
        # Decoding table: id -> text, or an int for byte tokens.
        self._decode_table: list = []
        for tok in self.tokens:
            if tok.startswith("<|byte") and tok.endswith("|>") and tok[6:-2].isdigit():
                self._decode_table.append(int(tok[6:-2]))
            elif tok.startswith("<|emoji") and tok.endswith("|>") and tok in self.emoji_inv:
                self._decode_table.append(self.emoji_inv[tok])
            elif tok == "<SP>":
                self._decode_table.append(" ")
            elif tok == "<TAB>":
                self._decode_table.append("\t")
            elif tok == "<BR>":
                self._decode_table.append(None)  # the breakline argument
            else:
                self._decode_table.append(tok)
        #: Ids of the byte tokens (``<|byteN|>``): text decoders hold them back until a character is whole.
        self.byte_ids = frozenset(i for i, v in enumerate(self._decode_table) if type(v) is int)

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Encoder(n_vocab={len(self)})"

    # -- encoding ---------------------------------------------------------

    def _replace_emoji(self, text: str) -> str:
        """Replace emoji keys one by one in table order, as the original does.

        Keys overlap ('☠️' lies inside '🏴‍☠️'), so the order matters. A key can
        only match if its first character is in the text, and a replacement
        only inserts ASCII, which no key contains, so restricting the loop to
        those keys gives exactly the original's result.
        """
        if not any(gate(text) for gate in self._emoji_gates):
            return text
        first = self._emoji_first.intersection(text)
        candidates = sorted(i for c in first for i in self._emoji_by_first[c])
        keys = self._emoji_keys
        for i in candidates:
            key, token = keys[i]
            if key in text:
                text = text.replace(key, token)
        return text

    def normalize(self, text: str, clean: bool = False) -> str:
        """The text the greedy matcher sees: whitespace, dashes and emoji
        rewritten to vocabulary tokens (and clean_text() with clean=True)."""
        for old, new in _PRE_REPLACE:
            if old in text:
                text = text.replace(old, new)
        text = self._replace_emoji(text)
        if clean:
            text = clean_text(text)
        return text

    def encode(self, text: str, clean: bool = False) -> list[int]:
        """Token ids of ``text``; ``clean=True`` applies the original's clean_text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, not {type(text).__name__}")
        bad = _SURROGATE.search(text)
        if bad is not None:
            raise EncodeError(
                f"cannot encode the text: character {bad.start()} is a lone surrogate "
                f"(U+{ord(bad.group()):04X}), which is not valid Unicode text"
            )
        return self._match(self.normalize(text, clean))

    def _match(self, text: str) -> list[int]:
        """Greedy longest match over normalized text.

        At '<' the vocabulary entries starting with '<' are tried longest
        first; anywhere else two characters, then one; a character that is
        not in the vocabulary becomes its UTF-8 byte tokens.
        """
        if not self._angle_split:
            return self._match_general(text)
        # Fast path, exact for vocabularies (like ja-bpe) in which '<' only
        # ever starts an entry and every longer '<' entry ends in '>': split
        # at '<' and run the two-character matcher on the pieces between.
        get = self.ids.get
        result: list[int] = []
        pieces = text.split("<")
        self._match_plain(pieces[0], 0, get, result)
        if len(pieces) == 1:
            return result
        lt_id = self._lt_id
        longest = self._angle_max - 1
        for piece in pieces[1:]:
            start = 0
            end = piece.find(">", 0, longest)
            # Try every '>' within reach, farthest first (longest match).
            if end >= 0:
                ends = [end]
                while True:
                    end = piece.find(">", end + 1, longest)
                    if end < 0:
                        break
                    ends.append(end)
                for end in reversed(ends):
                    tid = get("<" + piece[: end + 1])
                    if tid is not None:
                        result.append(tid)
                        start = end + 1
                        break
            if start == 0:
                if lt_id is None:
                    self._match_plain("<", 0, get, result)
                else:
                    result.append(lt_id)
            self._match_plain(piece, start, get, result)
        return result

    def _match_plain(self, text: str, pos: int, get, result: list) -> None:
        """Two-then-one character matching of text without '<' from pos."""
        append = result.append
        n = len(text)
        while pos < n:
            # At the last character the slice has one character only, which
            # is then exactly the one-character lookup.
            tid = get(text[pos : pos + 2])
            if tid is not None:
                append(tid)
                pos += 2
                continue
            tid = get(text[pos])
            if tid is not None:
                append(tid)
                pos += 1
            else:
                pos = self._fallback(text, pos, get, append, self._byte_ids)

    def _match_general(self, text: str) -> list[int]:
        """The same matching for any vocabulary, character by character."""
        get = self.ids.get
        byte_ids = self._byte_ids
        angle_lengths = self._angle_lengths
        result: list[int] = []
        append = result.append
        n = len(text)
        pos = 0
        while pos < n:
            if text[pos] == "<":
                for length in angle_lengths:
                    if pos + length <= n:
                        tid = get(text[pos : pos + length])
                        if tid is not None:
                            append(tid)
                            pos += length
                            break
                else:
                    pos = self._fallback(text, pos, get, append, byte_ids)
                continue
            tid = get(text[pos : pos + 2])
            if tid is not None and pos + 1 < n:
                append(tid)
                pos += 2
                continue
            tid = get(text[pos])
            if tid is not None:
                append(tid)
                pos += 1
            else:
                pos = self._fallback(text, pos, get, append, byte_ids)
        return result

    @staticmethod
    def _fallback(text, pos, get, append, byte_ids) -> int:
        """One character as UTF-8 byte tokens (after trying it alone)."""
        char = text[pos]
        tid = get(char)
        if tid is not None:
            append(tid)
            return pos + 1
        for b in char.encode("utf-8"):
            bid = byte_ids[b]
            if bid is None:
                raise EncodeError(f"the vocabulary has no <|byte{b}|> token for {char!r}")
            append(bid)
        return pos + 1

    def encode_batch(self, texts: Iterable[str], clean: bool = False) -> list[list[int]]:
        return [self.encode(t, clean) for t in texts]

    # -- decoding ---------------------------------------------------------

    def decode(self, ids, breakline: str = "\n") -> str:
        """Text of token ids; runs of byte tokens are joined as UTF-8
        (invalid sequences become U+FFFD)."""
        table = self._decode_table
        n_vocab = len(table)
        parts: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < n_vocab:
                raise EncodeError(f"token id {i} is out of range (vocabulary size {n_vocab})")
            piece = table[i]
            if type(piece) is int:
                pending.append(piece)
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            parts.append(breakline if piece is None else piece)
        if pending:
            parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_text(self, token_id: int) -> str:
        """The vocabulary string of one id (as written in ja-bpe.txt)."""
        return self.tokens[token_id]


# -- loading -----------------------------------------------------------------


def _candidate_dirs(vocab_dir) -> list[Path]:
    if vocab_dir is not None:
        return [Path(vocab_dir)]
    dirs = []
    env = os.environ.get("GPT2JA_VOCAB")
    if env:
        dirs.append(Path(env))
    dirs.append(Path(__file__).resolve().parent)
    return dirs


def find_vocab(vocab_dir=None) -> Path:
    """The first directory holding ja-bpe.txt and emoji.json, or VocabError."""
    dirs = _candidate_dirs(vocab_dir)
    for d in dirs:
        if (d / VOCAB_FILE).is_file() and (d / EMOJI_FILE).is_file():
            return d
    missing = []
    for d in dirs:
        names = [f for f in (VOCAB_FILE, EMOJI_FILE) if not (d / f).is_file()]
        missing.append(f"{d} (no {' or '.join(names)})")
    raise VocabError(
        f"vocabulary files {VOCAB_FILE} and {EMOJI_FILE} not found; looked in: "
        + "; ".join(missing)
        + f". Pass --vocab DIR or set GPT2JA_VOCAB; {VOCAB_SOURCE}"
    )


def _read_vocab(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            data = f.read()
    except UnicodeDecodeError as e:
        raise VocabError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); {VOCAB_SOURCE}") from None
    except OSError as e:
        raise VocabError(f"cannot read {path}: {e.strerror or e}; {VOCAB_SOURCE}") from None
    tokens = data.split("\n")
    if len(tokens) < 257 or EOS_TOKEN not in tokens[-2:]:
        raise VocabError(
            f"{path} does not look like the ja-bpe vocabulary ({len(tokens)} lines, "
            f"last entry should be {EOS_TOKEN}); {VOCAB_SOURCE}"
        )
    return tokens


def _read_emoji(path: Path) -> tuple[dict, dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabError(f"{path} is not valid JSON: {e}; {VOCAB_SOURCE}") from None
    except OSError as e:
        raise VocabError(f"cannot read {path}: {e.strerror or e}; {VOCAB_SOURCE}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("emoji"), dict)
        or not isinstance(data.get("emoji_inv"), dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in data["emoji"].items())
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in data["emoji_inv"].items())
    ):
        raise VocabError(
            f"{path} is malformed: expected an object with 'emoji' and 'emoji_inv' tables "
            f"of strings; {VOCAB_SOURCE}"
        )
    return data["emoji"], data["emoji_inv"]


def load(vocab_dir=None) -> Encoder:
    """Load the encoder from ``vocab_dir``, or else from $GPT2JA_VOCAB, or
    else from the encoder package directory.  Raises VocabError."""
    d = find_vocab(vocab_dir)
    tokens = _read_vocab(d / VOCAB_FILE)
    if tokens[-1] == "" and tokens[-2] == EOS_TOKEN:
        tokens.pop()  # a trailing newline at the end of the file is not an entry
    emoji, emoji_inv = _read_emoji(d / EMOJI_FILE)
    return Encoder(tokens, emoji, emoji_inv)
