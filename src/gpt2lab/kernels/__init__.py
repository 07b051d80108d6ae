"""Every speed path of the model, and the measured choice between them.

- native.py: gpt2lab's own C++ kernels (int8 / bf16 / fp32 matrix-vector products),
  compiled on first use, each with a fallback when it cannot be built.
"""

from .native import NAME, _build, _build_lock, cpu_has_vnni, int8_gemv  # noqa: F401
