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

import itertools
import math
import os
from collections.abc import Iterable, Sized
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch

from .errors import GPT2LabError

SEED_LIMIT = 2**64  # torch's generators take seeds in [0, 2**64)
# Requests up to this size are never checked against free memory (reading it costs a
# system call; an everyday cache or batch is far smaller than any machine's memory).
UNCHECKED_BYTES = 256 << 20
MAX_IDS = 1 << 20  # the most elements read from a lazy iterable (a range, a generator)


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


def as_list(value: Any) -> list | None:
    """The elements of a collection argument as a list, or None if `value` is not one.

    Any iterable but text counts (a list, tuple, range, set, numpy array, generator...):
    callers pass ids and words in whatever container they hold them. A str, bytes or
    bytearray is refused (its characters or bytes are not elements the caller meant).
    A set has no order, so its elements are sorted: the same set gives the same result
    in every run. A lazy iterable (a range, a generator) longer than MAX_IDS is refused
    after reading MAX_IDS + 1 elements, so `range(10**12)` or an endless generator
    cannot exhaust memory or hang; a list, tuple, set or array is already in memory and
    is read whole."""
    if isinstance(value, (str, bytes, bytearray, memoryview)) or not isinstance(value, Iterable):
        return None
    try:
        if isinstance(value, range) or not isinstance(value, Sized):
            out = list(itertools.islice(value, MAX_IDS + 1))
            if len(out) > MAX_IDS:
                return None
        else:
            out = list(value)
    except TypeError:  # iterable in type only: a 0-d numpy array, a 0-d tensor
        return None
    if isinstance(value, (set, frozenset)):
        try:
            out.sort()
        except TypeError:  # mixed kinds (ids and strings): any fixed order will do
            out.sort(key=repr)
    return out


def token_ids(
    name: str,
    value: Any,
    vocab: int | None = None,
    *,
    allow_one: bool = False,
    allow_empty: bool = False,
) -> list[int]:
    """A list of token ids in [0, vocab) (vocab None: no upper bound), from any iterable of
    ids (see `as_list`) or a 1-D integer tensor; with `allow_one`, a single id too; with
    `allow_empty`, no ids at all."""
    if allow_one and is_int(value):
        return [int(value)]
    if isinstance(value, torch.Tensor):
        ok = value.dim() == 1 and not value.dtype.is_floating_point and value.dtype != torch.bool
        ids = value.tolist() if ok else None
    else:
        ids = as_list(value)
    ok = (
        ids is not None
        and (allow_empty or len(ids) > 0)
        and all(is_int(t) and 0 <= t and (vocab is None or t < vocab) for t in ids)
    )
    if not ok:
        one = "a token id or " if allow_one else ""
        some = "a" if allow_empty else "a non-empty"
        where = f"in [0, {vocab})" if vocab is not None else ">= 0"
        raise GPT2LabError(
            f"{name} must be {one}{some} list of token ids {where}, got {show(value)}"
        )
    return [int(t) for t in ids]


def output_folder(path: Any, what: str = "output folder") -> Path:
    """Create an output folder (and its parents), or fail in one line naming it: a file in
    the way, no permission, a read-only file system."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPT2LabError(f"cannot create the {what} {folder}: {e.strerror or e}") from None
    return folder


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


def _read_int(path: str) -> int | None:
    """The integer in a one-line file (a cgroup control file), None if absent or not one
    ("max", cgroup v2's word for no limit)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: str, key: str) -> int:
    """One counter from a cgroup memory.stat file (0 when absent)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key and value.strip().isdigit():
                    return int(value)
    except OSError:
        pass
    return 0


CGROUP_ROOT = "/sys/fs/cgroup"
# (limit, usage, memory.stat, the reclaimable file cache in it) for cgroup v2, then v1
_CGROUPS = (
    ("memory.max", "memory.current", "memory.stat", "inactive_file"),
    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
     "total_inactive_file"),
)  # fmt: skip


def _cgroup_available() -> int | None:
    """What this process' container (cgroup v2, then v1) still lets it allocate: its
    memory limit minus what the container already uses, None where there is no limit.

    MemAvailable is the whole machine's, and the limit alone ignores what is in use: a
    container is killed when its own usage reaches its limit, however much the machine
    has free. The usage counts the page cache too; its inactive file pages are dropped
    before the container's out-of-memory killer runs, so they count as free (as `docker
    stats` does)."""
    for limit_file, usage_file, stat_file, cache_key in _CGROUPS:
        limit = _read_int(f"{CGROUP_ROOT}/{limit_file}")
        if limit is None or limit >= 1 << 60:  # "max" / a huge number: no limit here
            continue
        usage = _read_int(f"{CGROUP_ROOT}/{usage_file}")
        if usage is None:
            return limit
        usage -= min(usage, _stat(f"{CGROUP_ROOT}/{stat_file}", cache_key))
        return max(0, limit - usage)
    return None


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes that can still be allocated on `device` (None: unknown, so unchecked).

    CPU: MemAvailable from /proc/meminfo (or free physical pages where there is no
    /proc), or what the container's memory limit leaves if that is less. CUDA: the
    driver's free memory plus what PyTorch's caching allocator holds reserved but
    unused (freed tensors it keeps for reuse: free for our next allocation, though the
    driver counts them as taken)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        try:
            free = torch.cuda.mem_get_info(device)[0]
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        except (RuntimeError, AssertionError):
            return None
        return free + max(0, cached)
    if device.type != "cpu":
        return None  # meta allocates nothing; mps and others report no free memory
    available = _meminfo_available()
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    container = _cgroup_available()
    return available if container is None else min(available, container)


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
    "as_list",
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
