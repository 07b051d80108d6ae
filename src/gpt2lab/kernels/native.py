"""Native CPU kernels, compiled on first use; everything has a pure-PyTorch fallback.

`int8_gemv` (int8_gemv.cpp): int8-weight matrix-vector products for decoding. PyTorch's
own int8 weight-only kernel (`torch._weight_int8pack_mm`) converts every weight to
float before multiplying and is bound by that conversion, not by memory: at one row it
streams a gpt2-medium step's 302 MB of block weights in ~18 ms on the 2-core benchmark
machine, no faster than bf16 weights of twice the size. This kernel multiplies int8 by
int8 with AVX-512 VNNI (`vpdpbusd`, 64 products per instruction), so the weights are
read once and never converted: ~13 ms for the same weights, ~1.45x the decoding speed
of the int8 model. For that the activations become integers too, at 16-bit precision
(two int8 halves per value, see the .cpp), finer than the bf16 they come from.

It is built with `torch.utils.cpp_extension` (a C++ compiler and ninja are needed) into
torch's extension cache (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions)
the first time an int8 model decodes, once per machine and torch version: ~30 s on an
idle machine, a few minutes on a busy one (162 s was seen on 2 loaded cores), so it
says so on stderr when it starts and how long it took when done. It is
used only on x86-64 CPUs that report avx512_vnni. Where it cannot be built, or with
`GPT2LAB_INT8_KERNEL=0` in the environment, int8 layers use `torch._weight_int8pack_mm`
(one line on stderr says why, when a build was tried and failed).

Builds are serialised between processes by an `fcntl` lock of our own, which the
operating system releases when its holder dies. torch's own build lock is a plain file
(`lock` in the build folder) that a build killed half-way leaves behind, and every
later build then waits for it forever; holding our lock, any such file is known to be
stale and is removed. A process that waits longer than BUILD_WAIT_S for another
process's build falls back to torch's kernel instead of hanging.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

NAME = "gpt2lab_int8_gemv"
BUILD_WAIT_S = 600.0  # longest wait for another process's build before falling back

_int8_gemv = None
_tried = False
_once = threading.Lock()  # one build per process, however many threads decode at once
_clock = time.monotonic  # the build's timing (a test's fake clock replaces it)


def cpu_has_vnni() -> bool:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    flags = next(
        (set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set()
    )
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags


def int8_gemv():
    """The compiled `int8_gemv(x, q, q_sum, scales, bias)` (see int8_gemv.cpp), or None
    where it is switched off, unsupported or fails to build."""
    global _int8_gemv, _tried
    if not _tried:
        with _once:
            if not _tried:
                if os.environ.get("GPT2LAB_INT8_KERNEL", "1").strip() != "0" and cpu_has_vnni():
                    _int8_gemv = _build()
                _tried = True
    return _int8_gemv


def _build():
    try:
        from torch.utils import cpp_extension

        build_dir = Path(cpp_extension._get_build_directory(NAME, False))
        with _build_lock(build_dir):
            building = _say_if_building(build_dir)
            start = _clock()
            module = cpp_extension.load(
                name=NAME,
                sources=[str(Path(__file__).with_name("int8_gemv.cpp"))],
                extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                              "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )  # fmt: skip
            if building:
                print(f"gpt2lab: int8 kernel built in {_clock() - start:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
        return module.int8_gemv
    except Exception as err:  # no compiler, no ninja, a read-only cache, a busy lock
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"gpt2lab: int8 kernel not built ({reason[:200]}); "
            "using torch's slower int8 kernel instead",
            file=sys.stderr,
            flush=True,
        )
        return None


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
                    print("gpt2lab: waiting for another process building the int8 kernel ...",
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
    """One line on stderr when the kernel is not built yet, so minutes of compiling are
    not taken for a hang; returns whether a build is starting."""
    if any(build_dir.glob(f"{NAME}*.so")):
        return False
    print(
        "gpt2lab: building the int8 kernel (once per machine and torch version; "
        "this may take a few minutes) ...",
        file=sys.stderr,
        flush=True,
    )
    return True
