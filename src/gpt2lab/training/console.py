"""What a training run tells the person running it, on stdout, while it runs.

Two forms, chosen by whether stdout is a terminal (`progress.on_terminal`, as rich
decides it):

- a terminal gets a rich progress bar (steps done of all, loss, val, tokens/s, MFU,
  elapsed, ETA);
- a file or a pipe (`gpt2lab train run.toml > log.txt`, a batch job, `nohup`) gets
  plain lines, flushed as they are written: one for the first step, then one every
  `every_s` seconds, one for each evaluation and one for the last step, e.g.

      train: step 120/1500 (8%), loss 5.4321, val 5.6012 (step 100), 1,702 tok/s, MFU 31.0%, elapsed 1m10s, ETA 13m20s

  A bar redrawn in place writes nothing readable to a file.

In both forms the slow steps before the first training step (building or loading the
model, the first evaluation, measuring the device's matmul speed) are announced with
one line each as they start, so the first minutes are never a silent 0/N.

Why not `gpt2lab.progress.progress_bar`, the reporter the other long jobs share (and
whose formats this follows): training reports on stdout, not stderr (the run's
progress is its output, and `train > log.txt` must show it while it runs); a resumed
run starts at step s of N, and its rate and ETA must count only the steps of this
session; and the first step, each evaluation and the last step get a line whatever
the interval.

Warnings (an empty val split, a damaged checkpoint set aside) go to stderr as
"gpt2lab: warning: ..." lines in either form. log.jsonl holds the numbers in any
case; this is for people. The clock and the interval are injectable, so tests check
the lines without sleeping.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from ..progress import format_duration, format_rate, on_terminal

EVERY_S = 30.0  # seconds between plain progress lines


class Console:
    """The run's lines on stdout: phases, the resume line, per-step progress, a summary.

    enabled: False on processes other than the main one (torchrun), where nothing is
        printed at all, warnings included (the main process prints them once).
    progress: False (`log.progress = false`) leaves out the bar, the step lines and
        the phase lines; what the run did (where it resumed from, a new schedule, the
        summary) and warnings are still printed.
    tty: whether to draw a bar; by default, whether `stream` is a terminal."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        progress: bool = True,
        stream: TextIO | None = None,
        errors: TextIO | None = None,
        tty: bool | None = None,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.enabled, self.progress = enabled, progress
        self.stream = stream if stream is not None else sys.stdout
        self.errors = errors if errors is not None else sys.stderr
        self.tty = on_terminal(self.stream) if tty is None else tty
        self.every_s, self.clock = every_s, clock
        self.bar = None
        self.total = 0
        self._rates: list[float] = []  # tokens/s of the steps since the last line
        self._last_line = -float("inf")
        self._started = 0.0
        self._first_step = 0
        self._val: tuple[int, float] | None = None  # the latest evaluation (step, loss)

    # -- one-off lines ------------------------------------------------------------------------
    def say(self, message: str) -> None:
        """A line about what the run did (printed unless disabled)."""
        if self.enabled:
            self._line(f"train: {message}")

    def phase(self, message: str) -> None:
        """A line announcing a slow step before training starts (progress only)."""
        if self.enabled and self.progress:
            self._line(f"train: {message}")

    def warn(self, message: str) -> None:
        if self.enabled:
            print(f"gpt2lab: warning: {message}", file=self.errors, flush=True)

    def _line(self, text: str) -> None:
        if self.bar is not None:  # above the bar
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    # -- the steps -------------------------------------------------------------------------------
    def start(self, step: int, total: int) -> None:
        """Training steps begin at `step` (after a resume, not 0) of `total`."""
        self.total, self._first_step = total, step
        self._started = self.clock()
        if not (self.enabled and self.progress) or not self.tty or step >= total:
            return
        from rich.console import Console as RichConsole
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        # On a narrow terminal the numbers at the end are cut (ellipsis): every other
        # column keeps its width.
        def fixed(width: int) -> Column:
            return Column(min_width=width, no_wrap=True)

        counts = len(f"{total}/{total}")
        columns = [TextColumn("train", table_column=fixed(5)),
                   BarColumn(bar_width=20, table_column=fixed(10)),
                   MofNCompleteColumn(table_column=fixed(counts)),
                   TimeElapsedColumn(table_column=fixed(7)),
                   TextColumn("ETA", table_column=fixed(3)),
                   TimeRemainingColumn(table_column=fixed(7)),
                   TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis"))]  # fmt: skip
        self.bar = Progress(*columns, console=RichConsole(file=self.stream))
        self.task = self.bar.add_task("first step ...", total=total, completed=step)
        self.bar.start()

    def step(self, record: dict) -> None:
        """After every step: its log record (step, loss, tokens_per_s, mfu, val_loss)."""
        if not (self.enabled and self.progress):
            return
        if record.get("val_loss") is not None:
            self._val = (record["step"], record["val_loss"])
        self._rates.append(record["tokens_per_s"])
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], description=self._numbers(record))
            self._rates.clear()
            return
        now = self.clock()
        due = (
            record["step"] == self._first_step + 1
            or record["step"] >= self.total
            or "val_loss" in record
            or now - self._last_line >= self.every_s
        )
        if not due:
            return
        done = record["step"] - self._first_step  # steps of this session
        elapsed = now - self._started
        eta = elapsed / done * (self.total - record["step"]) if done else 0.0
        pct = 100 * record["step"] / self.total if self.total else 100.0
        self._line(
            f"train: step {record['step']}/{self.total} ({pct:.0f}%), {self._numbers(record)}, "
            f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}"
        )
        self._last_line = now
        self._rates.clear()

    def _numbers(self, record: dict) -> str:
        """loss, val (the latest), tokens/s (over the steps since the last line), MFU."""
        loss = "skipped" if record.get("loss") is None else f"{record['loss']:.4f}"
        parts = [f"loss {loss}"]
        if self._val is not None:
            at, val = self._val
            parts.append(f"val {val:.4f}" + ("" if at == record["step"] else f" (step {at})"))
        rates = self._rates or [record["tokens_per_s"]]
        # steps of equal tokens: the mean rate is the harmonic mean of the steps' rates
        mean = len(rates) / sum(1 / r for r in rates) if all(r > 0 for r in rates) else 0.0
        parts.append(f"{format_rate(mean)} tok/s")
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
