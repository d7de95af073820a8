"""Progress of a long step, readable in a terminal and in a log file alike.

On a terminal (`console.is_terminal`) it is a rich progress bar. Anywhere else (nohup, CI, a
notebook's captured output, a file) a bar would print nothing until it ends, so it prints one
plain line instead: at the start, every `every_fraction` of the total or every `every_seconds`,
whichever comes first, and at the end:

      train  120/1000 steps (12%)  loss 2.345  eval 2.401  1,234 tok/s  elapsed 0:02:03  ETA 0:15:20

Every stage uses the same helper:

    with progress(ctx.console, "tokenize", total=len(docs), unit="docs") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))
    bar.update(step, loss="2.345")   # set the position, and fields shown after the count
"""

from __future__ import annotations

import time
from typing import Any, Optional

EVERY_SECONDS = 30.0
"""Longest gap between two plain lines."""
EVERY_FRACTION = 0.1
"""A plain line at least every tenth of the total."""


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts `completed` out of `total` (None: unknown) and shows it; use `progress()` to make one."""

    def __init__(self, console: Any, label: str, total: Optional[float], *, unit: str = "",
                 completed: float = 0, rate_scale: float = 1.0, rate_unit: Optional[str] = None,
                 every_seconds: float = EVERY_SECONDS, every_fraction: float = EVERY_FRACTION):
        self.console = console
        self.label = label
        self.total = total
        self.unit = unit
        self.completed = self._start = completed
        self.rate_scale = rate_scale
        self.rate_unit = rate_unit or (f"{unit}/s" if unit else "/s")
        self.every_seconds = every_seconds
        self.every = total * every_fraction if total else None
        self.fields: dict[str, str] = {}
        self._started = self._last_time = time.perf_counter()
        self._last_count = completed
        self._last_fields: dict[str, str] = {}
        self._bar = None
        self._task = None
        self._closed = False

    # ----------------------------------------------------------------------------- state
    def rate(self, now: Optional[float] = None) -> Optional[float]:
        """Items (times rate_scale) per second since the start, or None before the first item."""
        elapsed = (time.perf_counter() if now is None else now) - self._started
        done = self.completed - self._start
        return done * self.rate_scale / elapsed if done > 0 and elapsed > 0 else None

    def eta(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds left at the pace so far, or None (unknown total, nothing done yet)."""
        elapsed = (time.perf_counter() if now is None else now) - self._started
        done = self.completed - self._start
        if not self.total or done <= 0:
            return None
        return max(0.0, (self.total - self.completed) * elapsed / done)

    def line(self, now: Optional[float] = None) -> str:
        """The plain progress line for the current state."""
        now = time.perf_counter() if now is None else now
        count = f"{self.completed:,.0f}" + (f"/{self.total:,.0f}" if self.total else "")
        parts = [f"  {self.label}  {count}" + (f" {self.unit}" if self.unit else "")
                 + (f" ({100 * self.completed / self.total:.0f}%)" if self.total else "")]
        parts += [f"{name} {value}" for name, value in self.fields.items()]
        rate, eta = self.rate(now), self.eta(now)
        if rate is not None:
            parts.append(f"{rate:,.1f} {self.rate_unit}" if rate < 10 else f"{rate:,.0f} {self.rate_unit}")
        parts.append(f"elapsed {format_seconds(now - self._started)}")
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        return "  ".join(parts)

    # ----------------------------------------------------------------------------- updates
    def start(self) -> "Progress":
        if getattr(self.console, "is_terminal", False):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self._bar = RichProgress(TextColumn(f"  {self.label}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[text]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.completed, text="")
        else:
            self._print()
        return self

    def update(self, completed: Optional[float] = None, *, force: bool = False, **fields: Any) -> None:
        """Set the position (when given) and the extra fields (name=value, shown as given);
        force: print a plain line now (for news worth a line, such as an evaluation result)."""
        if completed is not None:
            self.completed = completed
        self.fields.update({name: str(value) for name, value in fields.items() if value is not None})
        if self._bar is not None:
            rate = self.rate()
            text = "  ".join([f"{n} {v}" for n, v in self.fields.items()]
                             + ([f"{rate:,.0f} {self.rate_unit}"] if rate is not None else []))
            self._bar.update(self._task, completed=self.completed, text=text)
            return
        now = time.perf_counter()
        if force or now - self._last_time >= self.every_seconds or (
                self.every and self.completed - self._last_count >= self.every):
            self._print(now)

    def advance(self, amount: float = 1, **fields: Any) -> None:
        self.update(self.completed + amount, **fields)

    def close(self) -> None:
        """Final state: the bar stops; a plain line is printed unless the last one showed the same."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed)
            self._bar.stop()
        elif (self.completed, self.fields) != (self._last_count, self._last_fields):
            self._print()

    def _print(self, now: Optional[float] = None) -> None:
        now = time.perf_counter() if now is None else now
        self.console.print(self.line(now), markup=False, highlight=False)
        self._last_time, self._last_count, self._last_fields = now, self.completed, dict(self.fields)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(console: Any, label: str, total: Optional[float], **kwargs: Any) -> Progress:
    """A started Progress (see the module docstring); close it, or use it as a context manager."""
    return Progress(console, label, total, **kwargs).start()
