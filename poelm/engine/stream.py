"""Stop conditions, incremental text and the text stream of one prompt.

    for delta in engine.stream(prompt): print(delta, end="")
"""

from __future__ import annotations

from collections.abc import Iterator

from poelm.engine.options import DecodeOptions, Generation  # noqa: F401


class Collector:
    """Per-row new tokens, stop conditions and the (stop-string cut) text."""

    def __init__(self, n_rows: int, opts: DecodeOptions, tokenizer, stop_ids: set[int]):
        self.opts, self.tok, self.stop_ids = opts, tokenizer, stop_ids
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.reason: list[str | None] = [None] * n_rows
        self.cut: list[int | None] = [None] * n_rows  # text length where a stop string begins

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reason)

    def add(self, row: int, new: list[int]) -> None:
        for t in new:
            if self.reason[row] is not None:
                return
            self.tokens[row].append(t)
            if t in self.stop_ids:
                self.reason[row] = "stop_token"
            elif self.opts.stop_strings and len(self.tokens[row]) >= self.opts.min_tokens and self._find_stop(row):
                self.reason[row] = "stop_string"
            elif len(self.tokens[row]) >= self.opts.max_new_tokens:
                self.reason[row] = "max_new_tokens"

    def _find_stop(self, row: int) -> bool:
        text = self.raw_text(row)
        hits = [i for i in (text.find(s) for s in self.opts.stop_strings) if i >= 0]
        if hits:
            self.cut[row] = min(hits)
        return bool(hits)

    def raw_text(self, row: int) -> str:
        ids = self.tokens[row]
        if ids and ids[-1] in self.stop_ids and self.reason[row] == "stop_token":
            ids = ids[:-1]
        return self.tok.decode(ids)

    def text(self, row: int) -> str | None:
        if self.tok is None:
            return None
        text = self.raw_text(row)
        return text[: self.cut[row]] if self.cut[row] is not None else text

    def stable_text(self, row: int) -> str:
        """The text that can no longer change: no trailing incomplete UTF-8 character (U+FFFD)
        and no tail that could still become a stop string."""
        if self.reason[row] is not None:
            return self.text(row)
        text = self.raw_text(row).rstrip("\ufffd")
        hold = 0
        for s in self.opts.stop_strings:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return text[: len(text) - hold]


class TextStream:
    """Iterator of text deltas for one prompt; `.result` holds the Generation afterwards.
    Deltas never split a character and concatenate to `.result.text`. `session` is an
    engine Session (advance() -> False when done, .collector, .results())."""

    def __init__(self, session, row: int = 0):
        self.session, self.row = session, row
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        emitted = ""
        while self.session.advance():
            stable = self.session.collector.stable_text(self.row)
            if len(stable) > len(emitted) and stable.startswith(emitted):
                yield stable[len(emitted):]
                emitted = stable
        self.result = self.session.results()[self.row]
        final = self.result.text or ""
        if len(final) > len(emitted) and final.startswith(emitted):
            yield final[len(emitted):]
