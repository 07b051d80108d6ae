"""Native CPU kernels, compiled on first use; everything has a pure-PyTorch fallback.

Decoding one token reads every weight once, so at a few rows a matrix product is
bound by how fast memory streams, and torch's kernels fall short of that: on the
2-core AMD EPYC (Zen 4) machine oneDNN's and MKL's one-row products reach about half
the read speed in float32 and a quarter in bf16, and `torch._weight_int8pack_mm`
(int8 weights) is bound by its own int8-to-float conversion. These kernels stream
each weight once, front to back, split over output columns between torch's threads,
and reach about the read speed of the memory (see benchmarks/kernels.py):

- `f32_gemv()(x, w, bias, act)`: float32, AVX-512F FMA.
- `bf16_gemv()(x, w, bias, act)`: bf16, AVX-512 BF16 (`vdpbf16ps`: exact products,
  float32 sums), rounded to bf16 once at the end.
- `int8_gemv()(x, q, q_sum, scales, bias, act)`: int8 weights x bf16 (or float32)
  activations, AVX-512 VNNI; the activations become integers at 16-bit precision
  (two int8 halves per value, see gemv_int8.cpp), finer than the bf16 they come from.

x is [M, K] (any M; rows go four at a time through each weight row, so prefill also
reads each weight once from memory), w [N, K] as in nn.Linear, bias [N] or empty;
act 0 none, 1 GELU (tanh approximation), 2 GELU (erf), applied to the float32 result
before its one rounding. K must be a multiple of 16 / 32 / 64 (f32 / bf16 / int8):
`gemv_supports` says so first; the kernels raise otherwise.

All three live in one extension module (gemv*.cpp), built with
`torch.utils.cpp_extension` (a C++ compiler and ninja are needed) into torch's
extension cache (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions) the first
time one is asked for, once per machine and torch version: ~50 s on the 2-core
machine, minutes on a busy one, so it says so on stderr when it starts and how long
it took when done. Each kernel file is compiled for its own instruction set, and
each kernel is offered only on an x86-64 Linux CPU that reports it (a CPU with VNNI
but no BF16 gets the int8 kernel, and the other way round). Where the module cannot
be built every getter returns None (one line on stderr says why, when a build was
tried and failed) and the caller uses torch. `GPT2LAB_NATIVE_KERNELS=0` switches all
of them off, `GPT2LAB_INT8_KERNEL=0` the int8 one; both are read by every getter
call (the module itself is built or loaded at most once per process).

Builds are serialised between processes by an `fcntl` lock of our own, which the
operating system releases when its holder dies. torch's own build lock is a plain file
(`lock` in the build folder) that a build killed half-way leaves behind, and every
later build then waits for it forever; holding our lock, any such file is known to be
stale and is removed. A process that waits longer than BUILD_WAIT_S for another
process's build falls back to torch's kernels instead of hanging.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

NAME = "gpt2lab_gemv"
SOURCES = ("gemv.cpp", "gemv_f32.cpp", "gemv_bf16.cpp", "gemv_int8.cpp", "step.cpp", "step_ops.cpp")
DEPENDS = (
    "chunks.h",
    "gemv.h",
    "gemv_common.h",
    "step.h",
)  # part of the build's hash: an edit rebuilds
BUILD_WAIT_S = 600.0  # longest wait for another process's build before falling back

# The CPU flags (as /proc/cpuinfo names them) each kernel needs, and the multiple of
# the input width it takes (one 512-bit vector of the weight type).
_NEEDS = {
    "f32": ({"avx512f", "fma"}, 16),
    "bf16": ({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}, 32),
    "int8": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, 64),
}

_module = None
_tried = False
_once = threading.Lock()  # one build per process, however many threads decode at once
_clock = time.monotonic  # the build's timing (a test's fake clock replaces it)


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """Read once: /proc/cpuinfo takes ~70 us to read, and a decode step asks ~100 times."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return next(
        (frozenset(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")),
        frozenset(),
    )


@lru_cache(maxsize=1)
def sources_digest() -> str:
    """A hash of the kernels' C++ sources and headers: a measured choice holds for the
    kernels it timed, so the chooser keys its answers by it (an edited kernel, a new
    version of gpt2lab, is measured again)."""
    import hashlib

    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in (*SOURCES, *DEPENDS):
        try:
            digest.update((here / name).read_bytes())
        except OSError:
            digest.update(name.encode())
    return digest.hexdigest()[:12]


def cpu_supports(kind: str) -> bool:
    """Whether this CPU has the instructions of kernel `kind` ("f32", "bf16", "int8")."""
    return _NEEDS[kind][0] <= _cpu_flags()


def cpu_has_vnni() -> bool:
    return cpu_supports("int8")


def gemv_supports(kind: str, in_features: int) -> bool:
    """Whether kernel `kind` takes an input width of `in_features` (it raises otherwise);
    says nothing about whether the kernel is available (its getter does)."""
    if kind not in _NEEDS:
        raise ValueError(f"unknown kernel {kind!r} (known: {', '.join(_NEEDS)})")
    return in_features > 0 and in_features % _NEEDS[kind][1] == 0


def _switched_on(kind: str) -> bool:
    if os.environ.get("GPT2LAB_NATIVE_KERNELS", "1").strip() == "0":
        return False
    return kind != "int8" or os.environ.get("GPT2LAB_INT8_KERNEL", "1").strip() != "0"


def _kernel(kind: str):
    if not (_switched_on(kind) and cpu_supports(kind)):
        return None
    module = _load()
    return None if module is None else getattr(module, f"{kind}_gemv")


def _load():
    """The built module (None where it cannot be built), built at most once per process."""
    global _module, _tried
    if not _tried:
        with _once:
            if not _tried:
                _module = _build()
                _tried = True
    return _module


def f32_gemv():
    """The compiled `f32_gemv(x, w, bias, act)`, or None where it is switched off,
    unsupported or fails to build."""
    return _kernel("f32")


def bf16_gemv():
    """The compiled `bf16_gemv(x, w, bias, act)`, or None where it is switched off,
    unsupported or fails to build."""
    return _kernel("bf16")


def int8_gemv():
    """The compiled `int8_gemv(x, q, q_sum, scales, bias, act)`, or None where it is
    switched off, unsupported or fails to build."""
    return _kernel("int8")


def step_class(kind: str):
    """The compiled `Step` class (step.cpp: a whole decoding step in one call) for
    activations of kernel `kind` ("f32", "bf16", "int8"), or None where that kernel is
    switched off, unsupported or fails to build."""
    module = module_for(kind)
    return None if module is None else getattr(module, "Step", None)


def module_for(kind: str):
    """The built module where kernel `kind` ("f32", "bf16", "int8") is available (its
    instructions present, switched on, built), for the module's other functions that
    need the same instructions (`greedy` needs those of "f32"); else None."""
    return None if _kernel(kind) is None else _load()


def _build():
    """Builds (or loads from torch's cache) the module; None, said in one line, on failure."""
    try:
        from torch.utils import cpp_extension

        here = Path(__file__).parent
        build_dir = _build_dir(cpp_extension, here)
        with _build_lock(build_dir):
            building = _say_if_building(build_dir)
            start = _clock()
            module = cpp_extension.load(
                name=NAME,
                sources=[str(here / s) for s in SOURCES],
                extra_include_paths=[str(here)],
                extra_cflags=["-O3", "-fopenmp", f"-DGPT2LAB_HEADERS={_headers_hash(here)}"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )  # fmt: skip
            if building:
                print(f"gpt2lab: native kernels built in {_clock() - start:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
        return module
    except Exception as err:  # no compiler, no ninja, a read-only cache, a busy lock
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"gpt2lab: native kernels not built ({reason[:200]}); using torch's kernels instead",
            file=sys.stderr,
            flush=True,
        )
        return None


def _build_dir(cpp_extension, here: Path) -> Path:
    """torch's extension folder for NAME, one subfolder per installed copy of gpt2lab:
    torch's cache keys on the source paths, so two checkouts (two venvs, a CI clone)
    sharing one folder would each rebuild the module over the other's, every time."""
    import hashlib

    tag = hashlib.sha256(str(here.resolve()).encode()).hexdigest()[:12]
    path = Path(cpp_extension._get_build_directory(NAME, False)) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _headers_hash(here: Path) -> str:
    """A hash of the headers, passed as a define: torch's cache hashes only the sources
    and the flags, so without it an edited header would not rebuild the module."""
    import hashlib

    digest = hashlib.sha256(b"".join((here / d).read_bytes() for d in DEPENDS))
    return digest.hexdigest()[:16]


@contextmanager
def _build_lock(build_dir: Path, wait_s: float | None = None):
    """Hold gpt2lab's build lock for `build_dir`, clearing a stale torch lock file.

    Raises TimeoutError when another live process holds it for longer than `wait_s`."""
    import fcntl

    wait_s = BUILD_WAIT_S if wait_s is None else wait_s
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "gpt2lab.flock", "a") as f:
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process has been building it for over {wait_s:.0f} s"
                    ) from None
                if not said:
                    print("gpt2lab: waiting for another process building the native kernels ...",
                          file=sys.stderr, flush=True)  # fmt: skip
                    said = True
                time.sleep(0.5)
        try:
            stale = build_dir / "lock"  # torch's FileBaton, left by a killed build
            if stale.exists():
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _say_if_building(build_dir: Path) -> bool:
    """One line on stderr when the module is not built yet, so minutes of compiling are
    not taken for a hang; returns whether a build is starting."""
    if any(build_dir.glob(f"{NAME}*.so")):
        return False
    print(
        "gpt2lab: building the native CPU kernels (once per machine and torch version; "
        "this may take a few minutes) ...",
        file=sys.stderr,
        flush=True,
    )
    return True
