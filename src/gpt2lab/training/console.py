"""What a training run tells the person running it, on stdout, while it runs.

Two forms, chosen by whether stdout is a terminal:

- a terminal gets rich's progress bar (step M/N, time left, loss, tokens/s, MFU, val);
- a file or a pipe (`gpt2lab train run.toml > log.txt`, a batch job, `nohup`) gets
  plain lines, flushed as they are written: one for the first step, then one every
  `every_s` seconds, one for each evaluation and one for the last step, e.g.

      train: step 120/1500 (8%)  loss 5.4321  val 5.6012 (step 100)  1,702 tok/s  MFU 31.0%  elapsed 1:10  ETA 13:20

  A bar redrawn in place would write nothing readable to a file (and, before rich
  flushes it, nothing at all until the run ends).

In both forms the slow steps before the first training step (building or loading the
model, measuring the device's matmul speed, the first evaluation) are announced with
one line each as they start, so the first minutes are never a silent 0/N.

Warnings (an empty val split, a damaged checkpoint set aside) go to stderr as
"gpt2lab: warning: ..." lines whatever the form. log.jsonl holds the numbers in any
case; this is for people. The clock and the interval are injectable, so tests check
the lines without sleeping.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

EVERY_S = 30.0  # seconds between plain progress lines


def duration(seconds: float) -> str:
    """1:05 for 65 s, 1:01:05 for 3665 s (as `time` and rich print durations)."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Console:
    """The run's lines on stdout: phases, the resume line, per-step progress, a summary.

    enabled: False on processes other than the main one (torchrun), where nothing is
        printed at all, warnings included (the main process prints them once).
    progress: False (`log.progress = false`) leaves out the bar, the step lines and
        the phase lines; what the run did (resumed from, a new schedule) and warnings
        are still printed.
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
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty, self.every_s, self.clock = tty, every_s, clock
        self.bar = None
        self.total = 0
        self._since_line: list[float] = []  # tokens/s of the steps since the last line
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
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
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
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.description}"), console=RichConsole(file=self.stream))  # fmt: skip
        self.task = self.bar.add_task("first step ...", total=total, completed=step, start=True)
        self.bar.start()

    def step(self, record: dict) -> None:
        """After every step: its log record (step, loss, tokens_per_s, mfu, val_loss)."""
        if not (self.enabled and self.progress):
            return
        if record.get("val_loss") is not None:
            self._val = (record["step"], record["val_loss"])
        self._since_line.append(record["tokens_per_s"])
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], description=self._numbers(record))
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
        done = record["step"] - self._first_step
        elapsed = now - self._started
        eta = elapsed / done * (self.total - record["step"]) if done else 0.0
        pct = 100 * record["step"] / self.total if self.total else 100.0
        self._line(
            f"train: step {record['step']}/{self.total} ({pct:.0f}%)  {self._numbers(record)}  "
            f"elapsed {duration(elapsed)}  ETA {duration(eta)}"
        )
        self._last_line = now
        self._since_line.clear()

    def _numbers(self, record: dict) -> str:
        """loss, val (latest), tokens/s (mean over the steps since the last line), MFU."""
        loss = "skipped" if record.get("loss") is None else f"{record['loss']:.4f}"
        parts = [f"loss {loss}"]
        if self._val is not None:
            at, val = self._val
            parts.append(f"val {val:.4f}" + ("" if at == record["step"] else f" (step {at})"))
        rates = self._since_line or [record["tokens_per_s"]]
        mean = len(rates) / sum(1 / r for r in rates) if all(r > 0 for r in rates) else 0.0
        parts.append(f"{mean:,.0f} tok/s")
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        return "  ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
