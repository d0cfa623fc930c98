"""Generated token ids → text pieces that are safe to send: incremental detokenization that never splits a
character, and stop strings (text that could still grow into a stop string is held back until it cannot)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first new ones, so a leading space survives decoding


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        context = list(prompt_ids[-CONTEXT_TOKENS:])
        self._ids = context
        self._prefix = 0  # ids[_prefix:_read] were decoded already, as context for the next piece
        self._read = len(context)
        self._pending = ""  # decoded, not yet released (it may be the start of a stop string)
        self.text = ""  # released so far
        self.stopped = False  # a stop string was met: the text ends before it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that can be released now (often "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self._take_decoded(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """Generation ended (EOS or length): release everything still held."""
        if self.stopped:
            return ""
        self._take_decoded(final=True)
        return self._release(final=True)

    def _take_decoded(self, final: bool) -> None:
        if self._read == len(self._ids):
            return
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        # a trailing U+FFFD is half a character: wait for the token that completes it (unless this is the end)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._pending += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)

    def _release(self, final: bool) -> str:
        hits = [(i, s) for s in self.stop if (i := self._pending.find(s)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            out, self._pending, self.stopped = self._pending[:cut], "", True
        else:
            hold = 0 if final else self._held_back()
            out = self._pending[: len(self._pending) - hold]
            self._pending = self._pending[len(self._pending) - hold :]
        self.text += out
        return out

    def _held_back(self) -> int:
        """Length of the longest end of the pending text that is the start of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:k]):
                    best = k
                    break
        return best
