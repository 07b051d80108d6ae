"""Progress for long jobs, one reporter shared by every loop that knows its total
(scoring, patching, lens KL, tuned-lens training, the trainer).

    with progress_bar(total, "train", unit="steps") as advance:
        for step in ...:
            ...
            advance(1, loss=loss)          # fields show after the counts

Where it goes depends on who reads it:

- stderr is a terminal: a rich bar (transient by default), so the tables and text a
  command prints on stdout stay clean, piped or not;
- stderr is a file or a pipe (`cmd > log.txt 2>&1`, CI): plain lines, one every
  `interval` seconds (15 by default) and one at the end, e.g.
  `lens KL: 64/128 windows (50%), 1.3 windows/s, elapsed 49s, ETA 49s`. A job that
  ends before the first interval prints nothing, so short runs leave logs clean.

`enabled` picks whether to report at all: True (the CLI) reports in both ways, None
("auto", the Python API's default for long jobs) shows the bar on a terminal and stays
silent otherwise (a library should not write to a script's log unasked), False reports
nothing and costs nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

INTERVAL = 15.0  # seconds between plain progress lines


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default: stderr) is an interactive terminal, as rich decides it
    (FORCE_COLOR / TTY_COMPATIBLE included)."""
    from rich.console import Console

    stream = sys.stderr if stream is None else stream
    try:
        return Console(file=stream).is_terminal
    except Exception:  # a closed or odd stream: no bar
        return False


def resolve(enabled: bool | None, stream: TextIO | None = None) -> str | None:
    """The mode `progress_bar` uses: "bar", "lines" or None (nothing)."""
    if enabled is False:
        return None
    if on_terminal(stream):
        return "bar"
    return "lines" if enabled else None


@contextmanager
def progress_bar(
    total: int,
    description: str,
    enabled: bool | None = True,
    unit: str = "",
    *,
    transient: bool = True,
    interval: float | None = None,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Callable[..., None]]:
    """Report progress through `total` units of work; yields `advance(n=1, **fields)`.

    `fields` (e.g. loss=3.21) are shown after the counts, the latest value of each;
    `advance(0, loss=...)` only updates them. `transient=False` leaves the bar on the
    terminal when done. `interval` (default: the module's INTERVAL, read at call time),
    `stream` (default: sys.stderr at call time) and `clock` exist for tests and for
    callers that want another cadence.
    """
    stream = sys.stderr if stream is None else stream
    interval = INTERVAL if interval is None else interval
    mode = resolve(enabled, stream)
    if mode is None:
        yield _nothing
    elif mode == "bar":
        with _bar(total, description, unit, transient, stream) as advance:
            yield advance
    else:
        lines = LineReporter(total, description, unit, interval, stream, clock)
        yield lines.advance
        lines.finish()


def _nothing(n: int = 1, **fields: Any) -> None:
    pass


@contextmanager
def _bar(
    total: int, description: str, unit: str, transient: bool, stream: TextIO
) -> Iterator[Callable[..., None]]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns += [
        TextColumn("{task.fields[postfix]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    shown: dict[str, Any] = {}
    with Progress(*columns, console=Console(file=stream), transient=transient) as bar:
        task = bar.add_task(description, total=total, postfix="")

        def advance(n: int = 1, **fields: Any) -> None:
            if fields:
                shown.update(fields)
                bar.update(task, advance=n, postfix=format_fields(shown))
            else:
                bar.advance(task, n)

        yield advance


class LineReporter:
    """Plain progress lines for logs: what, done/total, rate, elapsed, ETA and fields.

    A line is written when `advance` finds `interval` seconds passed since the last one,
    and by `finish` if any line was written before (so a log shows the job ended)."""

    def __init__(
        self,
        total: int,
        description: str,
        unit: str = "",
        interval: float = INTERVAL,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.description, self.unit = total, description, unit
        self.interval, self.clock = interval, clock
        self.stream = sys.stderr if stream is None else stream
        self.start = self.last = clock()
        self.done = 0
        self.fields: dict[str, Any] = {}
        self.lines = 0

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.write(self.line(now))

    def finish(self) -> None:
        if self.lines:
            self.write(self.line(self.clock(), final=True))

    def write(self, line: str) -> None:
        self.lines += 1
        try:
            print(line, file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed log must not stop the job
            pass

    def line(self, now: float, final: bool = False) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"{self.description}: {self.done:,}/{self.total:,}{unit}"]
        if self.total > 0:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{format_rate(rate)} {self.unit or 'items'}/s")
        parts.append(f"{'done in' if final else 'elapsed'} {format_duration(elapsed)}")
        if not final:
            left = self.total - self.done
            eta = format_duration(left / rate) if rate > 0 and left >= 0 else "?"
            parts.append(f"ETA {eta}")
        if self.fields:
            parts.append(format_fields(self.fields))
        return ", ".join(parts)


def format_fields(fields: dict[str, Any]) -> str:
    """`loss 3.214, lr 0.0006`: floats to 4 significant digits, `_` read as a space."""
    out = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        out.append(f"{key.replace('_', ' ')} {value}")
    return ", ".join(out)


def format_rate(rate: float) -> str:
    """A rate with the digits that matter: 1,234 / 12.3 / 0.42."""
    if rate >= 100:
        return f"{rate:,.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    return f"{rate:.2f}"


def format_duration(seconds: float) -> str:
    """45s, 2m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
