"""Small argument checks shared by the model, generation, scoring, config and loading.

Each returns the value in its plain Python form or raises `GPT2LabError` with the
argument's name, what it must be and what it got, so every entry point words the same
mistake the same way. Two rules run through all of them:

- a bool is not a number: `True` would pass `isinstance(x, int)` and silently mean 1;
- a string is not a bool: `bool("false")` is True.

`check_memory` is the one place that decides whether a request is too big: it
compares the bytes an allocation would take with what the device can give, before
allocating, so a huge `num_beams` or `batch` is a clear error instead of an
out-of-memory kill of the whole process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch

from .errors import GPT2LabError

SEED_LIMIT = 2**64  # torch's generators take seeds in [0, 2**64)
# Requests up to this size are never checked against free memory (reading it costs a
# system call; an everyday cache or batch is far smaller than any machine's memory).
UNCHECKED_BYTES = 256 << 20


def is_int(value: Any) -> bool:
    """An integer that is not a bool (Python int, numpy integer, ...)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int, checked to lie in [low, high] (either bound may be None)."""
    if (
        not is_int(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        if low is not None and high is not None:
            want = f"an integer in [{low}, {high}]"
        elif low is not None:
            want = f"an integer >= {low}"
        elif high is not None:
            want = f"an integer <= {high}"
        else:
            want = "an integer"
        raise GPT2LabError(f"{name} must be {want}, got {show(value)}")
    return int(value)


def number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a finite float in the interval from low to high (open or closed ends)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        if low == -math.inf and high == math.inf:
            want = "a finite number"
        elif high == math.inf:
            want = f"a finite number {'>' if low_open else '>='} {low:g}"
        elif low == -math.inf:
            want = f"a finite number {'<' if high_open else '<='} {high:g}"
        else:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            want = f"a number in {interval}"
        raise GPT2LabError(f"{name} must be {want}, got {show(value)}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    """`value` if it is True or False (numpy's bool too); anything else is an error."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise GPT2LabError(f"{name} must be True or False, got {show(value)}")


def seed(value: Any) -> int | None:
    """A random seed: None (fresh randomness) or an integer in [0, 2**64)."""
    if value is None:
        return None
    if not is_int(value) or not 0 <= value < SEED_LIMIT:
        raise GPT2LabError(f"seed must be an integer in [0, 2**64), got {show(value)}")
    return int(value)


def token_ids(name: str, value: Any, vocab: int, *, allow_one: bool = False) -> list[int]:
    """A non-empty list of token ids in [0, vocab); with `allow_one`, a single id too."""
    if allow_one and is_int(value):
        value = [value]
    ok = isinstance(value, (Sequence, torch.Tensor)) and not isinstance(value, (str, bytes))
    if isinstance(value, torch.Tensor):
        ok = value.dim() == 1 and not value.dtype.is_floating_point and value.dtype != torch.bool
        value = value.tolist() if ok else value
    if ok:
        ok = len(value) > 0 and all(is_int(t) and 0 <= t < vocab for t in value)
    if not ok:
        one = "a token id or " if allow_one else ""
        raise GPT2LabError(
            f"{name} must be {one}a non-empty list of token ids in [0, {vocab}), got {show(value)}"
        )
    return [int(t) for t in value]


def show(value: Any) -> str:
    """A short repr for error messages (a huge list or tensor is not printed whole)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested; an int of > 4300 digits
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


# ---- memory ------------------------------------------------------------------------------
def _meminfo_available() -> int | None:
    """Linux's estimate of memory available without swapping (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit() -> int | None:
    """The memory limit of this process' container (cgroup v2, then v1), if any."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" / a huge number: no limit
            return int(text)
    return None


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes that can still be allocated on `device` (None: unknown, so unchecked).

    CPU: MemAvailable from /proc/meminfo (or free physical pages where there is no
    /proc), capped by a container's memory limit. CUDA: the driver's free memory."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None  # meta allocates nothing; mps and others report no free memory
    available = _meminfo_available()
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    limit = _cgroup_limit()
    return available if limit is None else min(available, limit)


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def check_memory(
    what: str, nbytes: int, device: torch.device | str | None = None, hint: str = "ask for less"
) -> None:
    """Raise GPT2LabError if `what` would need more memory than `device` has free.

    Called before allocating, once per call (never per decoding step); requests up to
    UNCHECKED_BYTES pass without asking the system. `hint` ends the message: what to do."""
    if nbytes <= UNCHECKED_BYTES:
        return
    available = available_memory(device)
    if available is not None and nbytes > available:
        raise GPT2LabError(
            f"{what} would need {format_bytes(nbytes)} of memory, but only "
            f"{format_bytes(available)} is available; {hint}"
        )


__all__ = [
    "available_memory",
    "boolean",
    "check_memory",
    "format_bytes",
    "integer",
    "is_int",
    "number",
    "seed",
    "show",
    "token_ids",
]
