"""Progress of a long step, readable in a terminal and in a log file alike.

On a terminal (`console.is_terminal`) it is a rich progress bar. Anywhere else (nohup, CI, a
notebook's captured output, a file) a bar would print nothing until it ends, so it prints one
plain line instead: at the start, every `every_fraction` of the total or every `every_seconds`,
whichever comes first, and at the end:

      train  120/1,000 steps (12%)  loss 2.345  eval 2.401  1,234 tok/s  elapsed 0:02:03  ETA 0:15:20

    with progress(ctx.console, "tokenize", total=len(docs), unit="docs") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))            # or bar.update(position, loss="2.345")

    with progress(ctx.console, "convert", None, heartbeat=True):   # one opaque call: elapsed time
        convert(...)

Code written against rich's `Progress` task API (add_task / advance / update / remove_task)
gets the same behaviour by creating it with `task_progress(console, *columns)`.
"""

from __future__ import annotations

import threading
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
                 every_seconds: float = EVERY_SECONDS, every_fraction: float = EVERY_FRACTION,
                 heartbeat: bool = False):
        self.console = console
        self.label = label
        self.unit = unit
        self.completed = self._start = completed
        self.rate_scale = rate_scale
        self.rate_unit = rate_unit or (f"{unit}/s" if unit else "/s")
        self.every_seconds = every_seconds
        self.every_fraction = every_fraction
        self.total, self.every = None, None
        self._set_total(total)
        self.fields: dict[str, str] = {}
        self._started = self._last_time = time.perf_counter()
        self._last_count = completed
        self._last_fields: dict[str, str] = {}
        self._bar = None
        self._task = None
        self._closed = False
        self._stop = threading.Event() if heartbeat else None

    def _set_total(self, total: Optional[float]) -> None:
        self.total = total
        self.every = total * self.every_fraction if total else None

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
        head = f"  {self.label}"
        if self.total or self.completed:
            head += f"  {self.completed:,.0f}" + (f"/{self.total:,.0f}" if self.total else "")
            head += (f" {self.unit}" if self.unit else "")
            head += (f" ({100 * self.completed / self.total:.0f}%)" if self.total else "")
        parts = [head] + [f"{name} {value}" for name, value in self.fields.items()]
        rate, eta = self.rate(now), self.eta(now)
        if rate is not None:
            space = "" if self.rate_unit.startswith("/") else " "
            parts.append(f"{rate:,.{1 if rate < 10 else 0}f}{space}{self.rate_unit}")
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
            if self._stop is not None:
                threading.Thread(target=self._beat, daemon=True).start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.every_seconds)):
            self.update()

    def update(self, completed: Optional[float] = None, *, total: Optional[float] = None, force: bool = False,
               **fields: Any) -> None:
        """Set the position and/or total (when given) and extra fields (name=value, shown as given);
        force: print a plain line now (for news worth a line, such as an evaluation result)."""
        if completed is not None:
            self.completed = completed
        if total is not None:
            self._set_total(total)
        self.fields.update({name: str(value) for name, value in fields.items() if value is not None})
        if self._bar is not None:
            rate = self.rate()
            text = "  ".join([f"{n} {v}" for n, v in self.fields.items()]
                             + ([f"{rate:,.0f} {self.rate_unit}"] if rate is not None else []))
            self._bar.update(self._task, completed=self.completed, total=self.total, text=text)
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
        if self._stop is not None:
            self._stop.set()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed)
            self._bar.stop()
        elif (self.completed, self.fields) != (self._last_count, self._last_fields) or not self.total:
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


class PlainTasks:
    """rich Progress's task API (add_task, advance, update, remove_task), one plain-line Progress per task."""

    def __init__(self, console: Any):
        self.console = console
        self.tasks: dict[int, Progress] = {}
        self._next_id = 0

    def add_task(self, description: str, total: Optional[float] = None, completed: float = 0, **_: Any) -> int:
        task_id, self._next_id = self._next_id, self._next_id + 1
        self.tasks[task_id] = progress(self.console, description, total, completed=completed)
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.tasks[task_id].advance(advance)

    def update(self, task_id: int, *, completed: Optional[float] = None, advance: Optional[float] = None,
               total: Optional[float] = None, **_: Any) -> None:
        task = self.tasks[task_id]
        task.update(task.completed + advance if advance is not None else completed, total=total)

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id).close()

    def __enter__(self) -> "PlainTasks":
        return self

    def __exit__(self, *exc) -> None:
        for task_id in list(self.tasks):
            self.remove_task(task_id)


def task_progress(console: Any, *columns: Any, transient: bool = True):
    """rich's `Progress(*columns, console=console)` on a terminal; plain lines per task elsewhere."""
    if getattr(console, "is_terminal", False):
        from rich.progress import Progress as RichProgress
        return RichProgress(*columns, console=console, transient=transient)
    return PlainTasks(console)
