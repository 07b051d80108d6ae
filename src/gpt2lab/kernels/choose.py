"""Which kernel runs each case, decided by timing the candidates on this CPU.

The fastest way to multiply by a weight depends on the CPU (and the thread count and the
torch version) more than on anything a rule can know: one-row bf16 matmuls in torch
stream ~2x faster through ATen's GEMV than through oneDNN on an AMD EPYC and no faster on
an Intel Sapphire Rapids, where oneDNN's bf16 prefill then wins through AMX. So each
case, a *key* such as `linear:bfloat16:1:4096:1024:none` (op, dtype, row bucket, weight
shape, fused activation), is decided once by measurement:
on first use every candidate runs on the call's own inputs, interleaved, a few times,
and the fastest by its best time wins (noise only ever adds time). A timed run of a
memory-bound case (a few rows) goes over copies of the weight totalling twice the
last-level cache, back to back, as decoding reads one weight after another: timing one
warm weight (4-12 MB fit in a 32 MB L3) picks the kernel fastest on cached data, and
flushing the cache before each run charges the kernel for a cold start that a decode
step, streaming weight after weight, does not pay. The answer is kept
for the process and written to a cache file keyed by the CPU model, its flags, the
thread count, the torch version and a hash of gpt2lab's native kernel sources (unless
the machine was busy while measuring: then this process's CPU time falls well short of
its threads' wall time, the answer is noise, and only this process uses it) (`~/.cache/gpt2lab/kernels.json`, or
`$GPT2LAB_KERNEL_CACHE`), so later processes time nothing. `gpt2lab tune` fills it ahead
of time; `gpt2lab info --kernels` shows the choices with their measured GB/s.

Forcing a choice, for checks and comparisons:
- `GPT2LAB_KERNELS="linear.bfloat16=native,attend.bfloat16=sdpa"` in the environment
  (an op, optionally `.dtype`, then `=candidate`; read when a case is first decided);
- `with kernels.force("linear.bfloat16", "onednn"): ...` for the calls inside the block,
  in this thread or task only (a context variable: other threads are not affected).
A forced candidate that cannot take the case (say `native` where it did not build)
falls back to the measured choice.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import GPT2LabError
from . import native

ROUNDS = 3  # timed runs per candidate (after one untimed warm-up), interleaved
# A measurement made while this process had less than this share of its threads' CPU
# time (other processes running) is used by this process but not written to the file.
QUIET_SHARE = 0.7
_forced: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "gpt2lab_forced_kernels", default=()
)


@dataclass(frozen=True)
class Choice:
    """A decided case: the winner, each candidate's best time (s), the bytes one call
    reads from its weights (for GB/s), and whether it was measured here, read from the
    cache file, or forced."""

    name: str
    seconds: dict[str, float]
    weight_bytes: int = 0
    source: str = "measured"

    @property
    def gbps(self) -> float | None:
        best = self.seconds.get(self.name)
        if not best or not self.weight_bytes:
            return None
        return self.weight_bytes / best / 1e9


def row_bucket(rows: int) -> int:
    """Cases are decided per power of two of rows (1, 2, 4, 8, ...; at most 1024), so a
    decode step, a small batch and a long prefill each get their own answer."""
    bucket = 1
    while bucket < rows and bucket < 1024:
        bucket *= 2
    return bucket


def machine_key() -> str:
    """What a measured choice depends on besides the case itself."""
    flags = ""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return (
        f"{model} | flags {digest} | {torch.get_num_threads()} threads | torch {torch.__version__}"
        f" | kernels {native.sources_digest()}"
    )


def _forced_by_env() -> dict[str, str]:
    return _parse_forced(os.environ.get("GPT2LAB_KERNELS", "").strip())


@lru_cache(maxsize=4)
def _parse_forced(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        what, sep, name = item.partition("=")
        if not sep or not what.strip() or not name.strip():
            raise GPT2LabError(
                f"GPT2LAB_KERNELS: {item!r} is not op=candidate "
                "(e.g. GPT2LAB_KERNELS=linear.bfloat16=native)"
            )
        out[what.strip()] = name.strip()
    return out


@contextmanager
def force(what: str, name: str) -> Iterator[None]:
    """Run the calls inside the block with candidate `name` for `what` ("linear", or
    "linear.bfloat16" for one dtype), in this thread / task only."""
    token = _forced.set(_forced.get() + ((what, name),))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_in_block(op: str, dtype: str) -> str | None:
    """The candidate forced for (op, dtype) by the innermost `force` block, or None.
    Cheap when there is none (every call asks)."""
    blocks = _forced.get()
    if not blocks:
        return None
    for what, name in reversed(blocks):
        if what in (op, f"{op}.{dtype}"):
            return name
    return None


def forced_for(op: str, dtype: str) -> str | None:
    """The candidate forced for (op, dtype) by `force` blocks or, failing those, by the
    environment (GPT2LAB_KERNELS), or None."""
    name = forced_in_block(op, dtype)
    if name is not None:
        return name
    env = _forced_by_env()
    return env.get(f"{op}.{dtype}") or env.get(op)


class Chooser:
    """The decided cases of one process, backed by the cache file.

    Thread-safe: a case is timed by one thread while others asking for the same case
    wait for its answer; the dict is only ever added to."""

    def __init__(
        self, path: str | os.PathLike | None = None, clock: Callable[[], float] | None = None
    ):
        self.path = Path(path) if path is not None else self.default_path()
        self.clock = clock or time.perf_counter
        self.choices: dict[tuple, Choice] = {}  # decided in this process (or checked)
        self._from_file: dict[str, Choice] = {}  # read, not yet checked against candidates
        self._lock = threading.RLock()  # a candidate may itself pick (int8 copy vs dense)
        self._loaded = False
        self._machine = machine_key()

    @staticmethod
    def default_path() -> Path:
        if os.environ.get("GPT2LAB_KERNEL_CACHE"):
            return Path(os.environ["GPT2LAB_KERNEL_CACHE"])
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "gpt2lab" / "kernels.json"

    # ---- the cache file -----------------------------------------------------------------
    def _read_file(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):  # none yet, unreadable or corrupt: measure again
            return {}

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for key, entry in self._read_file().get(self._machine, {}).items():
            try:
                self._from_file[key] = Choice(
                    str(entry["name"]), {str(k): float(v) for k, v in entry["seconds"].items()},
                    int(entry.get("weight_bytes", 0)), "cache file",
                )  # fmt: skip
            except (KeyError, TypeError, ValueError, AttributeError):
                continue

    def _save(self, key: tuple, choice: Choice) -> None:
        """Merge one answer into the file (another process may have added others);
        written to a temporary file and renamed, so a reader never sees half a file.
        A cache that cannot be written only costs the next process a measurement."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = self._read_file()
            entry = {"name": choice.name, "seconds": choice.seconds,
                     "weight_bytes": choice.weight_bytes}  # fmt: skip
            data.setdefault(self._machine, {})[file_key(key)] = entry
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass

    # ---- deciding -----------------------------------------------------------------------
    def pick(
        self,
        key: tuple,
        candidates: dict[str, Callable[[int], object]],
        *,
        op: str,
        dtype: str,
        weight_bytes: int = 0,
        copies: int = 1,
    ) -> str:
        """The candidate to run for `key`. `candidates` maps names to callables running
        the case on the call's inputs (results discarded), given which of `copies`
        copies of the weight to use (0 = the weight itself); the first candidate is the
        reference, used when nothing else can run."""
        names = list(candidates)
        forced = forced_in_block(op, dtype)
        if forced is not None and forced in candidates:
            return forced  # (for this call only)
        forced = forced_for(op, dtype)
        if forced is not None and forced in candidates:  # by the environment: kept
            self.choices[key] = Choice(forced, {}, weight_bytes, "forced by GPT2LAB_KERNELS")
            return forced
        if len(names) == 1:
            return names[0]
        choice = self.choices.get(key)
        if choice is None or choice.name not in candidates:
            with self._lock:  # another thread may have decided it meanwhile
                self._load()
                choice = self.choices.get(key) or self._from_file.get(file_key(key))
                if choice is None or choice.name not in candidates:  # (a kernel not built here)
                    choice = self.measure(candidates, weight_bytes, copies)
                    if choice.source == "measured":  # under load: this process only
                        self._save(key, choice)
                self.choices[key] = choice
        return choice.name

    def measure(
        self, candidates: dict[str, Callable[[int], object]], weight_bytes: int = 0, copies: int = 1
    ) -> Choice:
        """Time every candidate: one untimed run each (which also drops any that fail on
        this case), then ROUNDS interleaved timed runs, each over all `copies`; the
        fastest best time (per copy) wins."""
        alive = {}
        for name, run in candidates.items():
            try:
                run(0)
                alive[name] = run
            except Exception:  # a kernel that cannot take this case is no candidate
                continue
        if not alive:
            raise GPT2LabError("no kernel could run this case")
        best = {name: float("inf") for name in alive}
        wall, cpu = self.clock(), time.process_time()
        for _ in range(ROUNDS):
            for name, run in alive.items():
                start = self.clock()
                for copy in range(copies):
                    run(copy)
                best[name] = min(best[name], (self.clock() - start) / copies)
        winner = min(best, key=lambda name: (best[name], list(alive).index(name)))
        share = self.cpu_share(self.clock() - wall, time.process_time() - cpu)
        source = "measured" if share >= QUIET_SHARE else f"measured under load ({share:.0%} CPU)"
        return Choice(winner, best, weight_bytes, source)

    def cpu_share(self, wall: float, cpu: float) -> float:
        """The share of the cores this process had while measuring: kernels keep their
        threads busy (waiting on memory included), so anything well under 1 means other
        processes took the cores, and every candidate's time is theirs too."""
        if self.clock is not time.perf_counter or wall <= 0:
            return 1.0  # (a test's fake clock)
        return cpu / (wall * max(torch.get_num_threads(), 1))


@lru_cache(maxsize=1)
def cache_budget() -> int:
    """Twice the largest CPU cache (from sysfs; 32 MB if unknown), within 32-512 MB."""
    size = 32 << 20
    folder = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in folder.glob("index*"):
            text = (index / "size").read_text().strip().upper()
            factor = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            size = max(size, int(text.rstrip("KM")) * factor)
    except (OSError, ValueError):
        pass
    return min(max(2 * size, 32 << 20), 512 << 20)


def copies_for(weight_bytes: int) -> int:
    """How many copies of a weight a timed run goes over: twice the cache in all, at
    most 64 (one copy for a weight already that big)."""
    budget = cache_budget()
    return max(1, min(64, -(-budget // max(weight_bytes, 1))))


def file_key(key: tuple) -> str:
    return ":".join(str(part) for part in key)


_chooser: Chooser | None = None
_chooser_lock = threading.Lock()


def chooser() -> Chooser:
    """The process's chooser (made on first use)."""
    global _chooser
    if _chooser is None:
        with _chooser_lock:
            if _chooser is None:
                _chooser = Chooser()
    return _chooser
