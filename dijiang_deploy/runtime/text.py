"""Streaming text: incremental detokenization and stop strings, O(1) per token.

Both keep only a short tail: the decoder the bytes of a character not yet
complete, the stop matcher the longest suffix that may still become a stop
string. Neither re-reads the text generated so far.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

from .tokenizer import TextTokenizer


class StreamDecoder:
    """Token ids to text pieces as they arrive (``tokenizers``' ``DecodeStream``).

    A multi-byte character split across tokens comes out with its last token;
    :meth:`flush` returns what is still pending at the end (an incomplete
    character decodes to U+FFFD, as a whole-sequence decode would give).
    """

    def __init__(self, tokenizer: TextTokenizer):
        from tokenizers.decoders import DecodeStream

        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        piece = self._stream.step(self._tok.backend, int(token_id))
        if piece is None:
            self._pending.append(int(token_id))
            return ""
        self._pending.clear()
        return piece

    def flush(self) -> str:
        if not self._pending:
            return ""
        text = self._tok.decode(self._pending)
        self._pending.clear()
        return text


class StopMatcher:
    """Finds stop strings in streamed text, holding back only what might start one.

    :meth:`push` takes each token's text piece and returns the text that is
    safe to emit; once a stop string is seen, :attr:`stopped` is True and the
    text is cut just before it. :meth:`tokens_kept` says how many tokens lie
    wholly before the cut, so token ids can be cut alike.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.emitted = 0
        self.stopped = False
        self._ends: list[int] = []  # text length after each token

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        total = (self._ends[-1] if self._ends else 0) + len(piece)
        self._ends.append(total)
        if not self.stops:
            self.emitted += len(piece)
            return piece
        buf = self._held + piece
        cut = min((j for j in (buf.find(s) for s in self.stops) if j >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            self.emitted += cut
            return buf[:cut]
        keep = self._hold_back(buf)
        out, self._held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self.emitted += len(out)
        return out

    def _hold_back(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """At the end of generation: the held-back text (no stop string completed)."""
        out, self._held = self._held, ""
        if not self.stopped:
            self.emitted += len(out)
        return out if not self.stopped else ""

    def tokens_kept(self) -> int:
        """Tokens whose text ends at or before the cut (all of them if none)."""
        if not self.stopped:
            return len(self._ends)
        return bisect_right(self._ends, self.emitted)
