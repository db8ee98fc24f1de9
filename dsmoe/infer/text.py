"""Output text as it is generated: stop strings, and never streaming a piece that may still change."""
from __future__ import annotations

from typing import Sequence

from dsmoe.data.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder shows for the first bytes of a character not yet complete


class TextStream:
    """Decodes one sequence's output ids and says how much of the text is final.

    A stop string ends the output before its first occurrence. While generating, the text that could
    still be the start of a stop string, and trailing replacement characters (a multi-byte character
    whose remaining bytes are still to come), are held back, so streamed pieces are never retracted:
    the concatenated pieces equal the final text."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.emitted = 0  # characters of the text already handed out

    def update(self, ids: Sequence[int], final: bool) -> tuple[str, bool]:
        """(new final text since the last call, whether a stop string ended the output)."""
        text = self.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        stopped = cut >= 0
        if stopped:
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text) - self._held_back(text)
        piece = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece, stopped

    def _held_back(self, text: str) -> int:
        n = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self.stop:  # the longest tail of the text that begins a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    n = max(n, k)
                    break
        return n
