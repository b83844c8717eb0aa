"""The gpt2ja tokenizer for Hugging Face transformers (shipped in exports).

``python -m model export ... --format hf`` copies this file into the export
folder as ``tokenization_gpt2ja.py``; ``tokenizer_config.json`` names it in its
``auto_map``, so that::

    AutoTokenizer.from_pretrained(OUT, trust_remote_code=True)

gives ``GPT2JapaneseTokenizer``, which encodes and decodes exactly as the
encoder of the released gpt2ja models (the Japanese-BPEEncoder vocabulary
``ja-bpe.txt`` and emoji table ``emoji.json``): spaces, line breaks and tabs
rewritten to ``<SP>``/``<BR>``/``<TAB>``, emoji to ``<|emojiN|>``, a greedy
longest match over at most two characters (any length for ``<...>`` entries),
and characters outside the vocabulary as their UTF-8 bytes ``<|byteN|>``.
``clean=True`` (at load time or per call) applies the original's clean_text
(needs the ``jaconv`` package).

The file stands alone: it imports only the standard library, transformers
(when present) and jaconv (when present and asked for), and nothing of the
gpt2-japanese project.  Without transformers, ``JapaneseBPE`` (the encoder
itself) still works, so the project's own tests read this file without it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

try:
    from transformers import PreTrainedTokenizer
except ImportError:  # the project's own tools and tests, without transformers
    PreTrainedTokenizer = object

try:
    import jaconv
except ImportError:  # only clean=True needs it
    jaconv = None

VOCAB_FILES = {"vocab_file": "ja-bpe.txt", "emoji_file": "emoji.json"}
EOS = "<|endoftext|>"

# The rewrites before matching, in this order.
_REWRITES = (
    (" ", "<SP>"), ("\u3000", "<SP>"),
    ("\r\n", "<BR>"), ("\n", "<BR>"), ("\r", "<BR>"),
    ("\t", "<TAB>"),
    ("\u2014", "\u30fc"), ("\u2212", "\u30fc"),
)
_DECODE_SPECIAL = {"<SP>": " ", "<TAB>": "\t", "<BR>": "\n"}
_BYTE = re.compile(r"<\|byte(\d+)\|>\Z")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_WHEN = r"(\d{1,2}|:|\d{1,2}時|\d{1,2}分|\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\))*"
_NUM = r"(0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)"
# clean_text's substitutions, in this order.
_CLEAN = tuple((re.compile(p), r) for p, r in (
    (r"(https?|ftp)(:\/\/[-_\.!~*\'()a-zA-Z0-9;\/?:\@&=\+$,%#]+)", "<URL>"),
    (r"[A-Za-z0-9\._+]*@[\-_0-9A-Za-z]+(\.[A-Za-z]+)*", "<EMAIL>"),
    (r"[\(]{0,1}[0-9]{2,4}[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}", "<TEL>"),
    (r"([12]\d{3}[/\-年])*(0?[1-9]|1[0-2])[/\-月]((0?[1-9]|[12][0-9]|3[01])日?)*" + _WHEN, "<DATE>"),
    (r"(明治|大正|昭和|平成|令和|㍾|㍽|㍼|㍻|\u32ff)\d{1,2}年(0?[1-9]|1[0-2])月(0?[1-9]|[12][0-9]|3[01])日" + _WHEN,
     "<DATE>"),
    (f"({_NUM}*億)*({_NUM}*万)*({_NUM}*千)*{_NUM}*"
     r"(千円|万円|千万円|円|千ドル|万ドル|千万ドル|ドル|千ユーロ|万ユーロ|千万ユーロ|ユーロ)+(\(税込\)|\(税抜\)|\+tax)*",
     "<PRICE>"),
))


class JapaneseBPE:
    """The encoder: ``encode(text, clean=False) -> ids`` and ``decode(ids) -> text``."""

    def __init__(self, tokens: List[str], emoji: Dict[str, str], emoji_inv: Dict[str, str]):
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.emoji = list(emoji.items())
        self.emoji_inv = dict(emoji_inv)
        self.angle_lengths = sorted({len(t) for t in self.tokens if t.startswith("<")}, reverse=True)
        self.byte_ids = [self.vocab.get("<|byte%d|>" % b) for b in range(256)]
        # id -> text piece, or an int (a byte) for byte tokens
        self.pieces: List[object] = []
        for t in self.tokens:
            m = _BYTE.match(t)
            if m and int(m.group(1)) < 256:
                self.pieces.append(int(m.group(1)))
            else:
                self.pieces.append(self.emoji_inv.get(t, _DECODE_SPECIAL.get(t, t)))

    @classmethod
    def from_files(cls, vocab_file: str, emoji_file: str) -> "JapaneseBPE":
        with open(vocab_file, encoding="utf-8", newline="") as f:
            tokens = f.read().split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        with open(emoji_file, encoding="utf-8") as f:
            table = json.load(f)
        return cls(tokens, table["emoji"], table["emoji_inv"])

    def normalize(self, text: str, clean: bool = False) -> str:
        for old, new in _REWRITES:
            text = text.replace(old, new)
        present = set(text)
        for key, token in self.emoji:  # table order: keys overlap
            if key and key[0] in present and key in text:
                text = text.replace(key, token)
                present.update(token)
        if clean:
            if jaconv is None:
                raise ImportError("clean=True needs the jaconv package: pip install jaconv")
            text = jaconv.z2h(text, kana=False, digit=True, ascii=True)
            for pattern, token in _CLEAN:
                text = pattern.sub(token, text)
        return text

    def encode(self, text: str, clean: bool = False) -> List[int]:
        bad = _LONE_SURROGATE.search(text)
        if bad:
            raise ValueError(f"cannot encode a lone surrogate (U+{ord(bad.group()):04X}) at character {bad.start()}")
        text = self.normalize(text, clean)
        vocab = self.vocab
        ids: List[int] = []
        pos, n = 0, len(text)
        while pos < n:
            lengths = self.angle_lengths if text[pos] == "<" else (2, 1)
            for length in lengths:
                if pos + length <= n:
                    tid = vocab.get(text[pos:pos + length])
                    if tid is not None:
                        ids.append(tid)
                        pos += length
                        break
            else:
                for b in text[pos].encode("utf-8"):
                    if self.byte_ids[b] is None:
                        raise ValueError(f"the vocabulary has no <|byte{b}|> token for {text[pos]!r}")
                    ids.append(self.byte_ids[b])
                pos += 1
        return ids

    def decode(self, ids) -> str:
        out: List[str] = []
        pending = bytearray()
        for i in ids:
            piece = self.pieces[int(i)]
            if isinstance(piece, int):
                pending.append(piece)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            out.append(piece)
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class GPT2JapaneseTokenizer(PreTrainedTokenizer):
    """The gpt2ja encoder as a transformers tokenizer (see the module's text)."""

    vocab_files_names = VOCAB_FILES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, emoji_file, clean: bool = False, unk_token=EOS, bos_token=EOS,
                 eos_token=EOS, pad_token=None, **kwargs):
        self.bpe = JapaneseBPE.from_files(vocab_file, emoji_file)
        self.vocab_file, self.emoji_file, self.clean = vocab_file, emoji_file, clean
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("spaces_between_special_tokens", False)
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         clean=clean, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.bpe.tokens)

    def get_vocab(self) -> Dict[str, int]:
        return dict(self.bpe.vocab)

    def tokenize(self, text: str, clean: Optional[bool] = None, **kwargs) -> List[str]:
        """The whole text through the encoder at once (``<|endoftext|>`` included), as the original."""
        tokens = self.bpe.tokens
        return [tokens[i] for i in self.bpe.encode(text, self.clean if clean is None else clean)]

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return self.tokenize(text, **kwargs)

    def _convert_token_to_id(self, token: str) -> int:
        return self.bpe.vocab.get(token, self.bpe.vocab[EOS])

    def _convert_id_to_token(self, index: int) -> str:
        return self.bpe.tokens[index]

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        vocab, eos = self.bpe.vocab, self.bpe.vocab[EOS]
        return self.bpe.decode(vocab.get(t, eos) for t in tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            token_ids = [i for i in token_ids if i not in special]
        return self.bpe.decode(token_ids)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str, ...]:
        paths = []
        for source, name in ((self.vocab_file, VOCAB_FILES["vocab_file"]), (self.emoji_file, VOCAB_FILES["emoji_file"])):
            target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + name)
            if os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)
            paths.append(target)
        return tuple(paths)
