"""The shared progress reporter: a rich bar on a terminal, plain periodic lines in a log
(driven here by a fake clock, so nothing sleeps), nothing when disabled."""

from __future__ import annotations

import io
import re

import pytest

from gpt2lab.progress import (
    format_duration,
    format_fields,
    format_rate,
    progress_bar,
    resolve,
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)


def test_mode_follows_the_stream_and_the_switch():
    log, tty = io.StringIO(), Terminal()
    assert resolve(True, log) == "lines"
    assert resolve(None, log) is None  # auto: silent in a log
    assert resolve(False, log) is None
    assert resolve(True, tty) == "bar"
    assert resolve(None, tty) == "bar"
    assert resolve(False, tty) is None


def test_log_lines_every_interval_and_at_the_end():
    log, clock = io.StringIO(), Clock()
    with progress_bar(100, "lens KL", unit="windows", interval=10, stream=log, clock=clock) as adv:
        for i in range(100):
            clock.now += 0.5  # 2 windows/s: a line every 20 windows
            adv(1, loss=3.0 - i / 100)
    lines = log.getvalue().splitlines()
    assert len(lines) == 6  # at 10 s, 20 s, ..., 50 s, and the end
    assert lines[0] == (
        "lens KL: 20/100 windows (20%), 2.00 windows/s, elapsed 10s, ETA 40s, loss 2.81"
    )
    assert lines[3].startswith(
        "lens KL: 80/100 windows (80%), 2.00 windows/s, elapsed 40s, ETA 10s"
    )
    assert lines[-1] == "lens KL: 100/100 windows (100%), 2.00 windows/s, done in 50s, loss 2.01"


def test_a_short_job_leaves_the_log_empty():
    log, clock = io.StringIO(), Clock()
    with progress_bar(10, "scoring", stream=log, clock=clock, interval=15) as advance:
        for _ in range(10):
            clock.now += 1
            advance()
    assert log.getvalue() == ""


def test_fields_only_updates_and_no_total():
    log, clock = io.StringIO(), Clock()
    with progress_bar(0, "warming up", stream=log, clock=clock, interval=5) as advance:
        clock.now += 6
        advance(0, tokens_per_s=1234.5, step="a")
    (line, final) = log.getvalue().splitlines()
    assert line == "warming up: 0/0, 0.00 items/s, elapsed 6s, ETA ?, tokens per s 1234, step a"
    assert final.startswith("warming up: 0/0, 0.00 items/s, done in 6s")


def test_disabled_prints_nothing_anywhere():
    for stream in (io.StringIO(), Terminal()):
        with progress_bar(5, "x", enabled=False, stream=stream, interval=0) as advance:
            advance(5, loss=1.0)
        assert stream.getvalue() == ""


def test_auto_is_silent_in_a_log():
    log = io.StringIO()
    with progress_bar(5, "x", enabled=None, stream=log, interval=0) as advance:
        advance(5)
    assert log.getvalue() == ""


def test_terminal_gets_a_rich_bar_with_fields_erased_at_the_end():
    tty = Terminal()
    with progress_bar(4, "tuned lens", unit="steps", stream=tty) as advance:
        for _ in range(4):
            advance(1, KL=0.125)
    screen = tty.getvalue()
    assert "tuned lens" in screen and "steps" in screen and "KL 0.125" in screen
    assert "\x1b[2K" in screen[screen.rindex("tuned lens") :]  # transient: erased
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "4/4" in plain


def test_a_closed_log_does_not_stop_the_job():
    log, clock = io.StringIO(), Clock()
    with progress_bar(3, "x", stream=log, clock=clock, interval=1) as advance:
        log.close()
        clock.now += 2
        advance()  # would write a line: the error is swallowed
        advance(2)


def test_formats():
    assert [format_duration(s) for s in (0, 44.6, 125, 3725)] == ["0s", "45s", "2m05s", "1h02m"]
    assert [format_rate(r) for r in (0.4237, 12.34, 12345.6)] == ["0.42", "12.3", "12,346"]
    assert (
        format_fields({"loss": 3.14159, "lr": 6e-4, "step": 3}) == "loss 3.142, lr 0.0006, step 3"
    )
