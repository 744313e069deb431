"""Incremental detokenization: a growing list of token ids becomes text that is final, token by token.

Final means no later token can change it: never half a UTF-8 character (byte-level tokens split multi-byte
characters), never the start of a stop string that the next tokens may complete. A stop string ends the text where
it begins, even across token boundaries; of overlapping stop strings the earliest wins.

Each token costs a bounded amount of work: only the ids since the last complete character are decoded again (with
the ids before them as context), and stop strings are looked for in the held-back tail and the new text only.
"""
from __future__ import annotations

from typing import Sequence

from ..tokenizer import Tokenizer


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into one of `stops` (so is held back)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Detokenizer:
    """One sequence's text. `push(token)` returns the newly final text, `finish()` the rest; `stopped` is set when a
    stop string completed (the text then ends before it and later tokens are ignored)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stop if s]
        self.ids: list[int] = []
        self._context = 0  # ids before this index are text already; those from it on are decoded again each push
        self._decoded = 0  # ids before this index produced complete characters
        self._parts: list[str] = []  # final text, in pieces (joined once, in `text`)
        self.held = ""  # decoded text held back: it may begin a stop string
        self.length = 0  # characters decoded so far (final and held), the offset of the next token's text
        self.stopped = False

    @property
    def text(self) -> str:
        """The text so far: what was released, plus what is held back."""
        return "".join(self._parts) + self.held

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        new = self._new_text()
        if not new or new.endswith("\ufffd"):  # an incomplete character waits for its next token
            return ""
        return self._release(new, final=False)

    def finish(self) -> str:
        """The rest of the text, incomplete characters included (as tokenizer.decode shows them)."""
        return "" if self.stopped else self._release(self._new_text(), final=True)

    def _new_text(self) -> str:
        """The text of the ids after the last complete character, decoded with the ids before them as context."""
        before = self.tokenizer.decode(self.ids[self._context:self._decoded])
        return self.tokenizer.decode(self.ids[self._context:])[len(before):]

    def _release(self, new: str, final: bool) -> str:
        self._context, self._decoded = self._decoded, len(self.ids)
        self.length += len(new)
        # A stop string that ends in the new text begins inside `candidate`: the text before `held` was released
        # because no end of it could begin one.
        candidate = self.held + new
        hits = [at for at in (candidate.find(s) for s in self.stops) if at >= 0]
        if hits:
            self.stopped = True
            out, self.held = candidate[:min(hits)], ""
        else:
            keep = 0 if final else stop_prefix_length(candidate, self.stops)
            out, self.held = candidate[:len(candidate) - keep], candidate[len(candidate) - keep:]
        self._parts.append(out)
        return out
