"""Interleaved timing shared by the benchmarks: each side runs once per round, in turn,
so drift in machine load hits every side alike; callers report the best round (noise
only ever adds time) and the median as a cross-check."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_rounds(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Run each function once per round, in turn; return every round's seconds per name."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def show_rounds(times: dict[str, list[float]], file=None) -> None:
    for name, ts in times.items():
        print(f"  {name:<24} rounds (s): " + " ".join(f"{t:.3f}" for t in ts), file=file)
