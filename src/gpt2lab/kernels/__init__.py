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
the first time an int8 model decodes, ~30 s once per machine and torch version. It is
used only on x86-64 CPUs that report avx512_vnni. Where it cannot be built, or with
`GPT2LAB_INT8_KERNEL=0` in the environment, int8 layers use `torch._weight_int8pack_mm`
(one line on stderr says why, when a build was tried and failed).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

_int8_gemv = None
_tried = False


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
        _tried = True
        if os.environ.get("GPT2LAB_INT8_KERNEL", "1").strip() != "0" and cpu_has_vnni():
            _int8_gemv = _build()
    return _int8_gemv


def _build():
    try:
        from torch.utils import cpp_extension

        _say_if_building(cpp_extension)
        module = cpp_extension.load(
            name="gpt2lab_int8_gemv",
            sources=[str(Path(__file__).with_name("int8_gemv.cpp"))],
            extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                          "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )  # fmt: skip
        return module.int8_gemv
    except Exception as err:  # no compiler, no ninja, a read-only cache: fall back
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"gpt2lab: int8 kernel not built ({reason[:200]}); "
            "using torch's slower int8 kernel instead",
            file=sys.stderr,
            flush=True,
        )
        return None


def _say_if_building(cpp_extension) -> None:
    """One line on stderr when the kernel is not built yet, so ~30 s of compiling is
    not taken for a hang (torch's build cache is private API: silent if it moved)."""
    try:
        build_dir = Path(cpp_extension._get_build_directory("gpt2lab_int8_gemv", False))
    except Exception:
        return
    if not any(build_dir.glob("gpt2lab_int8_gemv*.so")):
        print("gpt2lab: building the int8 kernel (once, ~30 s) ...", file=sys.stderr, flush=True)
