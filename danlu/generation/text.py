"""Turning tokens into text while they arrive: whole characters only, stop strings held back and cut."""
from __future__ import annotations

from typing import Optional, Sequence


def find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _partial_stop_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of text that could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                longest = max(longest, n)
                break
    return longest


class IncrementalDecoder:
    """Decodes a growing list of token ids and hands out only text that is final."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        cut = find_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            piece = text[self.emitted:cut]
            self.emitted = cut
            return piece
        safe_end = len(text) - _partial_stop_suffix(text, self.stops)
        piece = text[self.emitted:safe_end]
        self.emitted = max(self.emitted, safe_end)
        return piece

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self._text()
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece
