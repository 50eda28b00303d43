"""Progress of a long loop: the rich bar on a terminal; in a log file (stdout not a terminal) a
plain line every PLAIN_EVERY seconds and at the end, so a redirected run shows where it is.

    with progress("train runs/x", total=800, completed=0) as bar:
        for step in ...:
            bar.update(step + 1, "loss 3.21")      # status: free text (the trainer's loss, tok/s)
    for batch in track(batches, "eval", total=32, tokens_per_item=8 * 1024):
        ...

A plain line: `train runs/x: step 120/800 (15%) | loss 3.21 | 1,234 tok/s | ETA 4m10s`
(tokens/s when the caller gives the tokens per item; ETA from the steps done in this process).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

PLAIN_EVERY = 30.0  # seconds between plain progress lines


def duration(seconds: float) -> str:
    """4m10s, 2h03m, 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PlainProgress:
    """Plain progress lines on a stream, at most one per `every` seconds (and the last one)."""

    def __init__(self, description: str, total: int | None, completed: int = 0, every: float | None = None,
                 stream=None, tokens_per_item: int | None = None, final: bool = True):
        self.description, self.total, self.start = description, total, completed
        self.every = PLAIN_EVERY if every is None else every
        self.stream = stream or sys.stdout
        self.tokens_per_item = tokens_per_item
        self.t0 = self.last = time.perf_counter()
        self.completed, self.status, self.shown = completed, "", completed
        self.final = final  # the last line even when no line was due before (else: only after one was)
        self.lines = 0

    def update(self, completed: int, status: str = "") -> None:
        self.completed, self.status = completed, status
        if time.perf_counter() - self.last >= self.every:
            self.emit()

    def line(self) -> str:
        done, elapsed = self.completed - self.start, time.perf_counter() - self.t0
        parts = [f"{self.description}: step {self.completed}" + (f"/{self.total} ({100 * self.completed / self.total:.0f}%)"
                                                                   if self.total else "")]
        if self.status:
            parts.append(self.status)
        if self.tokens_per_item and elapsed > 0:
            parts.append(f"{done * self.tokens_per_item / elapsed:,.0f} tok/s")
        if self.total and done > 0:
            parts.append(f"ETA {duration(max(0, self.total - self.completed) * elapsed / done)}")
        return " | ".join(parts)

    def emit(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last, self.shown, self.lines = time.perf_counter(), self.completed, self.lines + 1

    def close(self) -> None:
        if self.completed != self.shown and (self.final or self.lines):
            self.emit()


class RichProgress:
    """The rich bar (a terminal)."""

    def __init__(self, description: str, total: int | None, completed: int = 0):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), transient=False)
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, completed=completed, status="")

    def update(self, completed: int, status: str = "") -> None:
        self.bar.update(self.task, completed=completed, status=status)

    def close(self) -> None:
        self.bar.stop()


class NoProgress:
    def update(self, completed: int, status: str = "") -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def progress(description: str, total: int | None, completed: int = 0, enabled: bool = True,
             tokens_per_item: int | None = None, final: bool = True) -> Iterator[PlainProgress | RichProgress | NoProgress]:
    """The bar on a terminal, plain lines when stdout is not one (`final`: a last line at the end
    even when the loop was too short for one before), nothing when not `enabled`."""
    if not enabled:
        shown = NoProgress()
    elif sys.stdout.isatty():
        shown = RichProgress(description, total, completed)
    else:
        shown = PlainProgress(description, total, completed, tokens_per_item=tokens_per_item, final=final)
    try:
        yield shown
    finally:
        shown.close()


def track(items: Iterable, description: str, total: int | None = None, enabled: bool = True,
          tokens_per_item: int | None = None) -> Iterator:
    """Yield from `items`, showing progress per item (see `progress`; plain lines only when the loop
    lasts longer than PLAIN_EVERY)."""
    with progress(description, total, enabled=enabled, tokens_per_item=tokens_per_item, final=False) as shown:
        for n, item in enumerate(items, 1):
            yield item
            shown.update(n)
