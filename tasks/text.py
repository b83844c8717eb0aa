"""Text of generated samples: the context cut, incremental assembly, stop strings.

Written once for every front end (``tasks.scheduler`` uses it for the CLI, the server and bulk jobs).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple


def context_ids(enc, context: str, n_ctx: int) -> List[int]:
    """The tokens a sample continues, as the original keeps them: the context's last n_ctx/2
    tokens; an empty context means <|endoftext|>."""
    return cut_context(enc.encode(context if context != "" else "<|endoftext|>"), n_ctx, enc.eos_id)


def cut_context(ids: Sequence[int], n_ctx: int, eos_id: int) -> List[int]:
    """The context cut, for token ids (a list, or an array of them; the one place it is written): the
    last n_ctx/2 tokens, as a list; nothing at all means <|endoftext|>.  Only the tail is converted."""
    tail = ids[-(n_ctx // 2):]
    tail = tail.tolist() if hasattr(tail, "tolist") else list(tail)
    return tail if tail else [eos_id]


def cut_at_stop(text: str, stop: Sequence[str]) -> Tuple[str, bool]:
    """``text`` up to the first occurrence of any of ``stop``; (text, whether a stop string was found)."""
    first = -1
    for s in stop:
        if s:
            i = text.find(s)
            if i >= 0 and (first < 0 or i < first):
                first = i
    return (text, False) if first < 0 else (text[:first], True)


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` may still become the start of a stop string
    (the longest suffix of ``text`` that is a proper prefix of one of ``stop``)."""
    matcher = StopMatcher(stop)
    matcher.feed(text)
    return matcher.held


class StopMatcher:
    """Stop strings followed through a growing text, in time linear in the text.

    One Knuth-Morris-Pratt automaton per stop string: after ``feed(piece)``, ``found`` tells whether
    any stop string has occurred in the text so far, and ``held`` how many characters at its end are
    the start of a stop string (text that must not be shown yet).  Each character costs amortised
    O(1) per stop string, so long stop strings and long samples cost no more than their length.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self._fail = [_failure(s) for s in self.stop]
        self._state = [0] * len(self.stop)
        self.found = False

    def feed(self, piece: str) -> None:
        for j, s in enumerate(self.stop):
            k, fail, n = self._state[j], self._fail[j], len(s)
            for ch in piece:
                if k == n:
                    k = fail[k - 1]
                while k and s[k] != ch:
                    k = fail[k - 1]
                if s[k] == ch:
                    k += 1
                if k == n:
                    self.found = True
            self._state[j] = k

    @property
    def held(self) -> int:
        return max((k for k, s in zip(self._state, self.stop) if k < len(s)), default=0)


def _failure(s: str) -> List[int]:
    """KMP's failure function: fail[i] = the length of the longest proper prefix of s[:i+1] that is
    also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class TextAssembler:
    """Token ids in, finished text out.

    Byte tokens (``<|byteN|>``) are held back until the character they
    belong to is complete (a non-byte token follows, or the sample ends), so
    the pieces returned concatenate to exactly ``encoder.decode(ids)``.
    """

    def __init__(self, enc):
        self.enc = enc
        self.byte_ids = enc.byte_ids
        self.pending: List[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        if token in self.byte_ids:
            self.pending.append(token)
            return ""
        piece = self.enc.decode(self.pending + [token])
        self.pending = []
        self.text += piece
        return piece

    def finish(self) -> str:
        piece = self.enc.decode(self.pending) if self.pending else ""
        self.pending = []
        self.text += piece
        return piece
